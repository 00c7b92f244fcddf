"""Wire time of a whole secondary update vs one bare ISO-TP transfer (DESIGN 4, 9).

Sends a 256 KiB WASM module (blink v2 padded with a custom section) from a
primary-side ``CanSecondaryClient`` to a ``Secondary`` over a python-can
virtual bus with can-isotp, on classic CAN at 500 kbit/s and on CAN FD at
500 kbit/s / 2 Mbit/s (bit-rate switch). For each bus it prints:

- the wire time of the full update (time message, Director root + targets
  DER, image offer, every chunk and ack, install request and result with its
  signed report), counted frame by frame by ``BusAccounting``;
- the wire time of one bare ISO-TP transfer of the same 256 KiB (one message,
  its flow control and a one-frame reply) on the same bus;
- the host-side throughput of the update (image bytes / wall time, including
  partial verification, slot writes with fsync, and the WASM trial);
- ``ratio=`` update wire time / bare wire time (frame bits with their exact
  stuff bits, ``BusAccounting``'s default);
- ``paced ratio=``: the same update and bare transfer again with both nodes
  on a ``PacedBus`` (every frame takes its wire time; the one CAN scheduler
  holds a sender back rather than sleeping), wall time of the update / wall
  time of the bare transfer: what the bus idles while hosts verify, write
  slots and turn acks around. A paced sender may run up to
  ``ecus.transport.scheduler.PACE_SLACK`` (2 ms) ahead of the wire, so each
  message's last frames can arrive that much early: the update (about 20
  messages) gains at most ~40 ms on the bare transfer (2 messages) from it.
  Each paced figure is the fastest of ``--repeat`` runs (3). The primary
  keeps ``--window`` image chunks in flight (default 2: the next chunk crosses
  the bus while the secondary writes the last; ``--window 1 2`` also measures
  stop-and-wait in the same run). Pacing is per node, as in the bare
  transfer's flow control: the secondary's acks that overlap the primary's
  frames cost the primary no wire time here (on a real bus each delays it by
  its own wire time, about 0.1-0.25 ms, a handful per update); the bit
  ``ratio=`` above counts every frame of both nodes.

Run: ``.venv/bin/python bench/can_transfer.py [--chunk-kib 64]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

from securesystemslib.signer import CryptoSigner

from ecus.primary.can_link import DEFAULT_WINDOW, CanSecondaryClient
from ecus.secondary import Secondary
from ecus.transport.accounting import BusAccounting
from ecus.transport.isotp import CanBusConfig, CanNode, IsoTpConfig, IsoTpEndpoint
from uptane.metadata import Limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Director simulator lives with the tests

from helpers.director_sim import T0, VIN, DirectorSim, target_file, wasm_from_wat  # noqa: E402

IMAGE_SIZE = 256 * 1024
SERIAL, HW = "ecu-bench", "bench-hw"
CAPS = ("actuator.write", "health", "log", "sensor.read")


def paced(
    fd: bool, chunk_size: int, image: bytes, workdir: Path, windows: list[int], repeat: int
) -> list[str]:
    """``paced ratio=`` per window: fastest update / fastest bare transfer of ``repeat`` rounds.

    Each round runs every window's update (and its bare transfer) in turn, so all
    windows see the same load on the machine; the fastest runs are the ones least
    disturbed by it.
    """
    updates: dict[int, list[float]] = {w: [] for w in windows}
    bares: list[float] = []
    for _ in range(repeat):
        for window in windows:
            update, bare = _walls(run(fd, chunk_size, image, workdir, True, window))
            updates[window].append(update)
            bares.append(bare)
    kind = "CAN FD 500k/2M" if fd else "classic CAN 500k"
    bare = min(bares)
    return [
        f"{kind} paced, window {w}: update {min(updates[w]):.2f} s, bare transfer {bare:.2f} s "
        f"(fastest of {len(updates[w])} and {len(bares)}), "
        f"paced ratio={min(updates[w]) / bare:.4f}"
        for w in windows
    ]


def run(
    fd: bool,
    chunk_size: int,
    image: bytes,
    workdir: Path,
    paced: bool = False,
    window: int = DEFAULT_WINDOW,
) -> str:
    bus = CanBusConfig(channel=f"bench-{uuid.uuid4().hex}", fd=fd)
    tag = f"{fd}-{'paced' if paced else 'bits'}-{uuid.uuid4().hex[:6]}"
    accounting = BusAccounting(bus.timing)
    accounting.observe(bus.open())
    sim = DirectorSim()
    tf = target_file(
        "apps/blink_v2_256k.wasm",
        image,
        ecu_serial=SERIAL,
        hardware_ids=[HW],
        release_counter=2,
        capabilities=CAPS,
        limits=Limits(),
    )
    sim.publish_targets([tf])
    image_path = workdir / f"image-{tag}.wasm"
    image_path.write_bytes(image)
    update = sim.update_for(tf, image_path, after_root=0)  # the whole root chain (v1)

    signer = CryptoSigner.generate_ed25519()
    secondary = Secondary(
        ecu_serial=SERIAL,
        hardware_id=HW,
        vin=VIN,
        signer=signer,
        director_root=sim.root_ders[1],
        slot_dir=workdir / f"slots-{tag}",
        clock=lambda: T0,
        max_message=chunk_size + 1024,
    )
    primary_node = CanNode.open(bus, paced=paced)
    secondary_node = CanNode.open(bus, paced=paced)
    endpoints: list[IsoTpEndpoint] = []
    try:
        config = IsoTpConfig(0x701, 0x709, fd=fd, max_request=chunk_size + 1024, timeout=60.0)
        endpoint = secondary_node.endpoint(config, secondary.handle)
        endpoints.append(endpoint)
        endpoint.start()
        client = CanSecondaryClient(
            primary_node.link(config),
            SERIAL,
            chunk_size=chunk_size,
            clock=lambda: T0,
            window=window,
        )
        with accounting.transfer() as update_tx:
            start = time.perf_counter()
            report = client.send_update(update)
            wall = time.perf_counter() - start
        if secondary.store.active_target() is None:
            raise SystemExit(f"update failed: {report!r}")

        bare_config = IsoTpConfig(0x7A1, 0x7A9, fd=fd, max_request=IMAGE_SIZE + 64, timeout=60.0)
        bare_endpoint = secondary_node.endpoint(bare_config, lambda _: b"\x01")
        endpoints.append(bare_endpoint)
        bare_endpoint.start()
        bare_link = primary_node.link(bare_config)
        with accounting.transfer() as bare_tx:
            start = time.perf_counter()
            bare_link.request(image)
            bare_wall = time.perf_counter() - start
    finally:
        for e in endpoints:
            e.close()
        primary_node.close()
        secondary_node.close()
        accounting.close()

    u, b = update_tx.stats, bare_tx.stats
    ratio = u.wire_time / b.wire_time
    kind = "CAN FD 500k/2M" if fd else "classic CAN 500k"
    if paced:
        return (
            f"{kind} paced: update {wall:.2f} s (wire {u.wire_time:.2f} s), bare transfer "
            f"{bare_wall:.2f} s (wire {b.wire_time:.2f} s), paced ratio={wall / bare_wall:.4f}"
        )
    return (
        f"{kind}: update wire {u.wire_time:.3f} s ({u.frames} frames), "
        f"bare ISO-TP wire {b.wire_time:.3f} s ({b.frames} frames), "
        f"host {len(image) / wall / 1024:.1f} KiB/s ({wall:.2f} s), "
        f"chunk {chunk_size // 1024} KiB, ratio={ratio:.4f}"
    )


def _walls(line: str) -> tuple[float, float]:
    update = float(line.split("update ", 1)[1].split(" s", 1)[0])
    bare = float(line.split("bare transfer ", 1)[1].split(" s", 1)[0])
    return update, bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-kib", type=int, default=64, help="image chunk size in KiB")
    parser.add_argument("--repeat", type=int, default=3, help="paced runs per bus (best kept)")
    parser.add_argument(
        "--window",
        type=int,
        nargs="+",
        default=[DEFAULT_WINDOW],
        help="image chunks in flight for the paced runs (e.g. 1 2: stop-and-wait, then pipelined)",
    )
    args = parser.parse_args()
    image = wasm_from_wat(REPO / "demo" / "apps" / "blink_v2.wat", pad_to=IMAGE_SIZE)
    assert len(image) == IMAGE_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        for fd in (False, True):
            print(run(fd, args.chunk_kib * 1024, image, Path(tmp)), flush=True)
            for line in paced(
                fd, args.chunk_kib * 1024, image, Path(tmp), args.window, args.repeat
            ):
                print(line, flush=True)


if __name__ == "__main__":
    main()
