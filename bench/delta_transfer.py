"""Full image vs signed delta on the bus, for consecutive releases of real WASM modules.

The modules are not synthetic: two consecutive releases of each of two
packages on the npm registry, fetched once with ``npm pack`` into
``bench/.cache/`` (gitignored) and read from there afterwards:

- ``web-tree-sitter`` 0.26.12 -> 0.26.13 (``web-tree-sitter.wasm``, ~200 KB);
- ``sql.js`` 1.15.2 -> 1.16.0 (``dist/sql-wasm.wasm``, ~690 KB).

For each pair it makes the delta exactly as ``uptane image-repo add
--delta-from`` does (``image_repo.delta.make_delta``: detools sequential,
heatshrink 512 B window / 256 B lookahead), then, on classic CAN 500 kbit/s
and on CAN FD 500 kbit/s / 2 Mbit/s (bit-rate switch), sends the new release
to a ``Secondary`` that runs the old one, over a python-can virtual bus with
can-isotp, once in full and once as the delta (offer, every chunk and ack;
frames counted by ``BusAccounting``). It prints the bytes on the bus (CAN
frame data bytes), the wire time, ``ratio=`` delta wire time / full wire time
(goal <= 0.06 on the smaller change), and at the secondary the time to apply
the delta (streaming into the inactive slot, result verified) and the peak
Python heap (tracemalloc, all threads) while applying and while hashing the
result. A table of delta
sizes by library (detools variants; bsdiff4 and hdiffpatch when installed)
comes first. The install itself (WASM trial) is not run: these modules are
not ECU apps.

Run: ``.venv/bin/python bench/delta_transfer.py [--chunk-kib 32]`` (needs
``npm`` once, to fill the cache).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path

import detools
from securesystemslib.signer import CryptoSigner

from ecus.primary.can_link import CanSecondaryClient
from ecus.secondary import Secondary
from ecus.secondary.delta import DEFAULT_DELTA_MEMORY, decoder_memory, start_delta
from ecus.secondary.slot_state import InstalledTarget
from ecus.secondary.slots import SlotStore
from ecus.transport.accounting import BusAccounting, BusStats
from ecus.transport.isotp import CanBusConfig, CanNode, IsoTpConfig
from image_repo.delta import HEATSHRINK_LOOKAHEAD_SZ2, HEATSHRINK_WINDOW_SZ2, make_delta
from uptane.delta import DELTA_FORMAT, DeltaOffer
from uptane.manifest import InstalledImage

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
sys.path.insert(0, str(REPO / "tests"))  # the Director simulator lives with the tests

from helpers.director_sim import T0, VIN, DirectorSim, target_file  # noqa: E402

SERIAL, HW = "ecu-bench", "bench-hw"


@dataclass(frozen=True)
class Pair:
    package: str
    old: str
    new: str
    member: str  # path of the .wasm inside the npm tarball


PAIRS = (
    Pair("web-tree-sitter", "0.26.12", "0.26.13", "package/web-tree-sitter.wasm"),
    Pair("sql.js", "1.15.2", "1.16.0", "package/dist/sql-wasm.wasm"),
)


def fetch(package: str, version: str, member: str) -> bytes:
    """The module ``member`` of ``package@version``, from the cache or ``npm pack``."""
    cached = CACHE / f"{package}-{version}.wasm"
    if not cached.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                ["npm", "pack", f"{package}@{version}", "--pack-destination", tmp, "--silent"],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=300,
            )
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tar:
                f = tar.extractfile(member)
                if f is None:
                    raise SystemExit(f"{package}@{version} has no {member}")
                cached.write_bytes(f.read())
    return cached.read_bytes()


def library_sizes(old: bytes, new: bytes) -> str:
    """Delta size by library and format (percent of the new module)."""
    sizes: dict[str, int] = {"detools seq/heatshrink 9,8 (used)": len(make_delta(old, new))}
    for comp in ("none", "lzma", "zstd"):
        out = io.BytesIO()
        detools.create_patch(io.BytesIO(old), io.BytesIO(new), out, compression=comp)
        sizes[f"detools seq/{comp}"] = len(out.getvalue())
    try:
        import bsdiff4

        sizes["bsdiff4"] = len(bsdiff4.diff(old, new))
    except ImportError:
        pass
    try:
        import hdiffpatch

        sizes["hdiffpatch zstd"] = len(
            hdiffpatch.diff(old, new, compression=hdiffpatch.COMPRESSION_ZSTD)
        )
        sizes["hdiffpatch lzma"] = len(
            hdiffpatch.diff(old, new, compression=hdiffpatch.COMPRESSION_LZMA)
        )
    except ImportError:
        pass
    return ", ".join(f"{k} {v} B ({100 * v / len(new):.2f}%)" for k, v in sizes.items())


def _installed(name: str, data: bytes, counter: int) -> InstalledTarget:
    return InstalledTarget(
        name=name,
        length=len(data),
        hashes={
            "sha256": hashlib.sha256(data).hexdigest(),
            "sha512": hashlib.sha512(data).hexdigest(),
        },
        release_counter=counter,
        hardware_ids=(HW,),
    )


def seed(slot_dir: Path, name: str, data: bytes) -> InstalledTarget:
    """A slot store whose active slot holds ``data`` (as if installed before)."""
    store = SlotStore(slot_dir)
    target = _installed(name, data, 1)
    writer = store.begin_image(target)
    writer.write(0, data)
    writer.finish()
    store.start_trial()
    store.commit()
    return target


def apply_cost(workdir: Path, old: bytes, new: bytes, patch: bytes) -> tuple[float, int, int]:
    """Seconds to apply ``patch`` at a secondary (result verified), and the peak
    Python heap (bytes) while applying and while verifying the result."""
    store = SlotStore(workdir / "apply-slots")
    base = seed(store.path, "apps/old.wasm", old)
    store = SlotStore(store.path)
    result = _installed("apps/new.wasm", new, 2)
    offer = DeltaOffer(
        DELTA_FORMAT,
        InstalledImage(base.name, base.length, dict(base.hashes), 1),
        len(patch),
    )
    chunks = [patch[i : i + 4096] for i in range(0, len(patch), 4096)]
    tracemalloc.start()
    start = time.perf_counter()
    writer = start_delta(store, result, offer, memory_limit=DEFAULT_DELTA_MEMORY)
    for index, chunk in enumerate(chunks):
        writer.write(index * 4096, chunk)
    apply_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    writer.finish()
    seconds = time.perf_counter() - start
    verify_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, apply_peak, verify_peak


def transfer(
    fd: bool, chunk_size: int, pair: Pair, old: bytes, new: bytes, patch: bytes, workdir: Path
) -> tuple[BusStats, BusStats]:
    """Wire stats of sending ``new`` in full, then as ``patch``, to an ECU running ``old``."""
    bus = CanBusConfig(channel=f"delta-{uuid.uuid4().hex}", fd=fd)
    accounting = BusAccounting(bus.timing)
    accounting.observe(bus.open())
    sim = DirectorSim()
    name = f"apps/{pair.package}.wasm"
    tf = target_file(name, new, ecu_serial=SERIAL, hardware_ids=[HW], release_counter=2)
    sim.publish_targets([tf])
    slot_dir = workdir / f"slots-{pair.package}-{fd}"
    base = seed(slot_dir, name, old)
    secondary = Secondary(
        ecu_serial=SERIAL,
        hardware_id=HW,
        vin=VIN,
        signer=CryptoSigner.generate_ed25519(),
        director_root=sim.root_ders[1],
        slot_dir=slot_dir,
        clock=lambda: T0,
        max_message=chunk_size + 1024,
    )
    update = sim.update_for(tf, workdir / "unused", after_root=0)
    info = update.installed_image
    offer = DeltaOffer(
        DELTA_FORMAT, InstalledImage(base.name, base.length, dict(base.hashes), 1), len(patch)
    )
    primary_node = CanNode(bus.open())
    secondary_node = CanNode(bus.open())
    config = IsoTpConfig(0x701, 0x709, fd=fd, max_request=chunk_size + 1024, timeout=60.0)
    endpoint = secondary_node.endpoint(config, secondary.handle)
    try:
        endpoint.start()
        client = CanSecondaryClient(primary_node.link(config), SERIAL, chunk_size=chunk_size)
        client.push_metadata(update.director_root_chain, update.director_targets)
        with accounting.transfer() as full:
            client.send_image(new, info)
        with accounting.transfer() as delta:
            client.send_image(patch, info, delta=offer)
        writer = secondary._writer
        assert writer is not None
        writer.finish()  # the streamed result is the new release, every hash checked
    finally:
        endpoint.close()
        primary_node.close()
        secondary_node.close()
        accounting.close()
    return full.stats, delta.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk-kib", type=int, default=32, help="image chunk size in KiB")
    args = parser.parse_args()
    logging.disable(logging.ERROR)  # the secondary cannot run these modules: no app logs
    chunk = args.chunk_kib * 1024
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in PAIRS:
            old = fetch(pair.package, pair.old, pair.member)
            new = fetch(pair.package, pair.new, pair.member)
            label = f"{pair.package} {pair.old}->{pair.new}"
            print(f"{label}: {len(old)} -> {len(new)} B", flush=True)
            print(f"  delta sizes: {library_sizes(old, new)}", flush=True)
            patch = make_delta(old, new)
            work = Path(tmp) / pair.package
            seconds, apply_peak, verify_peak = apply_cost(work, old, new, patch)
            print(
                f"  secondary apply: {seconds * 1000:.0f} ms incl. result check; peak Python "
                f"heap {apply_peak / 1024:.1f} KiB applying (decoder bound "
                f"{decoder_memory(HEATSHRINK_WINDOW_SZ2, HEATSHRINK_LOOKAHEAD_SZ2) / 1024:.1f} "
                f"KiB, limit {DEFAULT_DELTA_MEMORY // 1024} KiB), {verify_peak / 1024:.1f} KiB "
                "hashing the result (64 KiB read blocks, as for full images)",
                flush=True,
            )
            for fd in (False, True):
                full, delta = transfer(fd, chunk, pair, old, new, patch, work)
                ratio = delta.wire_time / full.wire_time
                kind = "CAN FD 500k/2M" if fd else "classic CAN 500k"
                ratios[f"{label} {kind}"] = ratio
                print(
                    f"  {kind}: full {full.data_bytes} B on the bus, wire {full.wire_time:.3f} s; "
                    f"delta {delta.data_bytes} B, wire {delta.wire_time:.3f} s; ratio={ratio:.4f}",
                    flush=True,
                )
    smaller = min(ratios.values())
    print(f"smallest change: ratio={smaller:.4f} (goal <= 0.06)")


if __name__ == "__main__":
    main()
