"""Primary full verification time vs two bare ngclient refreshes (DESIGN 9).

For a vehicle of 1, 10 and 50 ECUs, each with an image assigned, against a
real Director and Image repository on loopback: time the primary's full
verification (Director + Image repository with ngclient, the sans-IO
re-check, Director checks, Director/Image matching of every target, DER
forms; manifests and image downloads excluded) from an empty trusted state,
and, in the same run and against the same servers, two bare ngclient
``Updater.refresh()`` calls (Director for this vehicle + Image repository)
from empty metadata dirs. Prints one line per vehicle size ending in
``ratio=<primary/bare>``; medians over ``--rounds`` rounds.

Run: ``.venv/bin/python bench/full_verification.py [--rounds N] [--sizes 1,10,50]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tuf.ngclient import Updater

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.servers import Switchboard, serve
from helpers.uptane_env import PRIMARY, VIN, Env, Servers, build_template

from ecus.primary import CycleResult


def vehicle(tmp: Path, template: Path, servers: Servers, ecus: int) -> Env:
    """A vehicle of ``ecus`` ECUs (primary included), one image assigned to each."""
    env = Env(tmp, template, servers, secondaries={f"ecu-{i:03d}": "hw-a" for i in range(1, ecus)})
    env.add_image("primary.wasm", 0, ("gateway",))
    env.assign("primary.wasm", PRIMARY)
    for i in range(1, ecus):
        env.add_image(f"app-{i:03d}.wasm", i, ("hw-a",))
        env.assign(f"app-{i:03d}.wasm", f"ecu-{i:03d}")
    return env


def primary_verification(env: Env, round_dir: Path) -> float:
    """Seconds of full verification in one cycle of a primary with empty trusted state."""
    primary = env.primary(state_dir=round_dir / "state", download_dir=round_dir / "images")
    result: CycleResult = primary.run_cycle()
    if not result.ok:
        raise SystemExit(f"primary cycle failed: {[str(i) for i in result.issues]}")
    return sum(result.timings.get(s, 0.0) for s in CycleResult.VERIFICATION_STAGES)


def bare_refreshes(env: Env, round_dir: Path) -> float:
    """Seconds of two bare ngclient refreshes (Director for this vehicle, Image) from scratch."""
    config = env.primary_config()
    director_dir, image_dir = round_dir / "bare-director", round_dir / "bare-image"
    director_dir.mkdir(parents=True)
    image_dir.mkdir(parents=True)
    start = time.perf_counter()
    Updater(
        str(director_dir),
        f"{env.servers.director_url}/vehicles/{VIN}/metadata/",
        bootstrap=config.director_root,
    ).refresh()
    Updater(
        str(image_dir), f"{env.servers.image_url}/metadata/", bootstrap=config.image_root
    ).refresh()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--sizes", default="1,10,50")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    image_sb, director_sb = Switchboard(), Switchboard()
    with (
        tempfile.TemporaryDirectory(prefix="bench-fullver-") as tmp,
        serve(image_sb) as image_url,
        serve(director_sb) as director_url,
    ):
        root = Path(tmp)
        servers = Servers(image_sb, image_url, director_sb, director_url)
        template = build_template(root / "template", image_url)
        for ecus in sizes:
            env = vehicle(root / f"vehicle-{ecus}", template, servers, ecus)
            try:
                primary_times, bare_times = [], []
                for n in range(args.rounds + 1):  # round 0 warms up
                    round_dir = root / f"vehicle-{ecus}" / f"round-{n}"
                    p = primary_verification(env, round_dir)
                    b = bare_refreshes(env, round_dir)
                    shutil.rmtree(round_dir)
                    if n:
                        primary_times.append(p)
                        bare_times.append(b)
            finally:
                env.close()
            primary_ms = statistics.median(primary_times) * 1000
            bare_ms = statistics.median(bare_times) * 1000
            print(
                f"ecus={ecus:<3d} primary_full_verification_ms={primary_ms:.1f} "
                f"two_bare_ngclient_refreshes_ms={bare_ms:.1f} ratio={primary_ms / bare_ms:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
