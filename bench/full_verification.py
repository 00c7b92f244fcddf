"""Primary full verification time vs two bare ngclient refreshes (DESIGN 9; issue 16).

For vehicles of 1, 10, 50 and 200 ECUs, each ECU with an image assigned, and
for a 10-ECU vehicle whose Image repository lists 1,000 images, against a
real Director and Image repository on loopback:

- cold: the primary's full verification (Director + Image repository with
  ngclient, the Uptane re-check, Director checks, Director/Image matching of
  every target, DER forms; manifests and image downloads excluded) from an
  empty trusted state, against two bare ngclient ``Updater.refresh()`` calls
  (Director for this vehicle + Image repository) from empty metadata dirs;
- warm: the same primary's next cycle with nothing changed on either
  repository (Uptane 5.4.4.2: the timestamps say nothing changed), against
  two bare ngclient refreshes over the metadata dirs the cold ones filled.

Both are measured in the same run against the same servers, back to back in
each round (which goes first alternates; garbage collected before each
measured part). One line per vehicle: median times over ``--rounds`` rounds
(round 0 warms up), and ``ratio=`` (cold) and ``warm_ratio=``: the median of
the rounds' own primary/bare ratios. Goals (issue 16): ratio <= 1.3 at 50
ECUs, <= 1.5 at 200, warm_ratio <= 1.1.

``--cpu`` measures CPU time of the measuring thread (``time.thread_time``:
the primary's or ngclient's own work, not the in-process servers') instead of
wall time, for a machine other jobs load.

Run: ``.venv/bin/python bench/full_verification.py [--rounds N] [--sizes 1,10,50,200]
[--image-targets 1000] [--cpu]`` (``--image-targets 0`` skips that vehicle).
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tuf.api.metadata import TargetFile, Targets
from tuf.ngclient import Updater

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.servers import Switchboard, serve
from helpers.uptane_env import PRIMARY, VIN, Env, Servers, build_template

from ecus.primary import CycleResult, Primary
from uptane.metadata import build_custom

TIMER = time.perf_counter


def vehicle(tmp: Path, template: Path, servers: Servers, ecus: int, extra: int = 0) -> Env:
    """``ecus`` ECUs (primary included), one image each; ``extra`` more unassigned images."""
    env = Env(tmp, template, servers, secondaries={f"ecu-{i:03d}": "hw-a" for i in range(1, ecus)})
    env.add_image("primary.wasm", 0, ("gateway",))
    env.assign("primary.wasm", PRIMARY)
    for i in range(1, ecus):
        env.add_image(f"app-{i:03d}.wasm", i, ("hw-a",))
        env.assign(f"app-{i:03d}.wasm", f"ecu-{i:03d}")
    if extra:
        blobs = {f"lib/other-{i:04d}.wasm": f"other image {i}".encode() for i in range(extra)}

        def add(targets: Targets) -> None:
            for name, data in blobs.items():
                target = TargetFile.from_data(name, data, ["sha256", "sha512"])
                target.unrecognized_fields["custom"] = build_custom(
                    hardware_ids=["hw-b"], release_counter=1
                )
                targets.targets[name] = target

        env.craft_image_role(Targets.type, add, blobs)
    return env


def verification_seconds(primary: Primary) -> float:
    """Seconds of full verification in one cycle of ``primary``."""
    result: CycleResult = primary.run_cycle()
    if not result.ok:
        raise SystemExit(f"primary cycle failed: {[str(i) for i in result.issues]}")
    return sum(result.timings.get(s, 0.0) for s in CycleResult.VERIFICATION_STAGES)


def bare_refreshes(env: Env, round_dir: Path) -> float:
    """Seconds of two bare ngclient refreshes (Director for this vehicle, Image)."""
    config = env.primary_config()
    director_dir, image_dir = round_dir / "bare-director", round_dir / "bare-image"
    director_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    start = TIMER()
    Updater(
        str(director_dir),
        f"{env.servers.director_url}/vehicles/{VIN}/metadata/",
        bootstrap=config.director_root,
    ).refresh()
    Updater(
        str(image_dir), f"{env.servers.image_url}/metadata/", bootstrap=config.image_root
    ).refresh()
    return TIMER() - start


def measure(env: Env, vehicle_dir: Path, rounds: int) -> tuple[float, ...]:
    """Medians: cold primary, cold bare, warm primary, warm bare seconds; cold, warm ratios.

    Each round measures both sides back to back, so its ratios share the load
    of that moment; which side goes first alternates between rounds, and
    garbage is collected before each measured part (neither side pays for
    the other's). The ratios are medians of the rounds' own ratios.
    """
    rows: list[tuple[float, float, float, float]] = []
    for n in range(rounds + 1):  # round 0 warms up
        round_dir = vehicle_dir / f"round-{n}"
        config = env.primary_config(
            state_dir=round_dir / "state", download_dir=round_dir / "images"
        )
        primary = Primary(config, env.secondaries.values(), clock=env.clock, timer=TIMER)

        def primary_side(primary: Primary = primary) -> tuple[float, float]:
            gc.collect()
            cold = verification_seconds(primary)
            gc.collect()
            return cold, verification_seconds(primary)

        def bare_side(round_dir: Path = round_dir) -> tuple[float, float]:
            gc.collect()
            cold = bare_refreshes(env, round_dir)
            gc.collect()
            return cold, bare_refreshes(env, round_dir)

        if n % 2:
            (bare_cold, bare_warm), (cold, warm) = bare_side(), primary_side()
        else:
            (cold, warm), (bare_cold, bare_warm) = primary_side(), bare_side()
        shutil.rmtree(round_dir)
        if n:
            rows.append((cold, bare_cold, warm, bare_warm))
    medians = [statistics.median(column) for column in zip(*rows, strict=True)]
    cold_ratio = statistics.median(c / b for c, b, _, _ in rows)
    warm_ratio = statistics.median(w / b for _, _, w, b in rows)
    return (*medians, cold_ratio, warm_ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sizes", default="1,10,50,200")
    parser.add_argument("--image-targets", type=int, default=1000)
    parser.add_argument("--cpu", action="store_true", help="thread CPU time, not wall time")
    args = parser.parse_args()
    # Each round is a fresh primary (empty state) whose report counters start again,
    # so the in-process Director rightly refuses its manifest as a replay and logs a
    # warning per refused manifest. Manifests are not part of what is measured.
    logging.getLogger("director.app").setLevel(logging.ERROR)
    global TIMER
    if args.cpu:
        TIMER = time.thread_time
    vehicles = [(int(s), 0) for s in args.sizes.split(",") if s]
    if args.image_targets:
        vehicles.append((10, args.image_targets))

    image_sb, director_sb = Switchboard(), Switchboard()
    with (
        tempfile.TemporaryDirectory(prefix="bench-fullver-") as tmp,
        serve(image_sb) as image_url,
        serve(director_sb) as director_url,
    ):
        root = Path(tmp)
        servers = Servers(image_sb, image_url, director_sb, director_url)
        template = build_template(root / "template", image_url)
        for ecus, extra in vehicles:
            label = f"vehicle-{ecus}-{extra}"
            env = vehicle(root / label, template, servers, ecus, extra)
            try:
                cold, bare_cold, warm, bare_warm, ratio, warm_ratio = measure(
                    env, root / label / "runs", args.rounds
                )
            finally:
                env.close()
            images = f"image_targets={ecus + extra:<4d}"
            print(
                f"ecus={ecus:<3d} {images} primary_full_verification_ms={cold * 1000:.1f} "
                f"two_bare_ngclient_refreshes_ms={bare_cold * 1000:.1f} "
                f"ratio={ratio:.2f} "
                f"warm_primary_ms={warm * 1000:.1f} warm_bare_ms={bare_warm * 1000:.1f} "
                f"warm_ratio={warm_ratio:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
