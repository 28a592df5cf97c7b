"""Manual chaos run: SIGKILL `ditto run` / `ditto rerun` at 20+ seeded random points and check that each
resumed run equals an uninterrupted one (benchmarks/crash_harness.py, which tests/test_crash_resume.py runs with
fewer points).

    python benchmarks/chaos.py                       # 20 points, 12 characters, 4 shards
    python benchmarks/chaos.py --points 40 --seed 123 --full-filter --keep
    python benchmarks/chaos.py --ops-episodes 2 --ops-kills 4    # also kill `ditto export` and `ditto repair`

After the run/rerun kills, `ditto export` and `ditto repair` (on a healthy and on a corrupted catalog) are
killed at random points in the first --ops-episodes homes: the export target must be absent or whole,
and the next repair must restore the same content.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from crash_harness import Chaos, characters_file, fast_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=20, help="kills that must land")
    ap.add_argument("--kills-per-episode", type=int, default=3, help="kill, resume, kill ... in one home")
    ap.add_argument("--seed", type=int, default=None, help="replay a run (printed at the start)")
    ap.add_argument("--characters", type=int, default=12)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--until", default=None, help="last stage (default: sft_data)")
    ap.add_argument("--full-filter", action="store_true", help="keep langid and the embedding model on")
    ap.add_argument("--ops-episodes", type=int, default=1, help="homes where export and repair are killed too")
    ap.add_argument("--ops-kills", type=int, default=2, help="kills of export and of repair per such home")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="ditto-chaos-"))
    chars = characters_file(work / "chars.jsonl", a.characters)
    ov = fast_overrides(chars, a.shards)
    if a.full_filter:
        ov = [o for o in ov if not o.startswith(("filter.language", "filter.identity"))]
    t0 = time.monotonic()
    chaos = Chaos(work / "chaos", ov, seed=a.seed, until=a.until)
    print(f"chaos: seed {chaos.seed}, work folder {work}", flush=True)
    chaos.measure_baseline()
    res = chaos.run_points(a.points, a.kills_per_episode)
    for i in range(min(a.ops_episodes, res.episodes)):
        chaos.ops_episode(i, a.ops_kills)
    (work / "chaos.json").write_text(json.dumps({"seed": res.seed, "kills": res.kills, "problems": res.problems},
                                                indent=2, default=str))
    print(f"chaos: {res.landed} kills landed, {res.processes} processes, {time.monotonic() - t0:.0f} s; "
          f"{len(res.problems)} problems; log {work / 'chaos.json'}")
    for p in res.problems:
        print("  PROBLEM:", p)
    if not a.keep and not res.problems:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if res.problems else 0


if __name__ == "__main__":
    sys.exit(main())
