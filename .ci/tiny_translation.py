"""CI's wheel check, part two: make a tiny base, a tiny original-layout model and an input image in
FOLDER with the checkout's test helpers, and the image the checkout's own code makes of them.

python .ci/tiny_translation.py FOLDER        (run with the checkout's venv; see .ci/wheel)
python .ci/tiny_translation.py FOLDER --compare OUT.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PROMPT = "a cat"


def make(folder: Path) -> None:
    from reference import RefPaired
    from tiny import make_tiny_base

    from turbo.pipeline import Pipeline

    base = make_tiny_base(folder / "base")
    RefPaired(str(base), twin=True, seed=5).save_pkl(folder / "model.pkl")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (61, 83, 3), dtype=np.uint8)).save(folder / "in.png")
    pipe = Pipeline(str(base), device="cpu")
    want = pipe.translate(Image.open(folder / "in.png"), folder / "model.pkl", PROMPT, gamma=0.4, seed=3)
    want.image.save(folder / "expected.png")


def compare(folder: Path, out: Path) -> int:
    got = np.asarray(Image.open(out).convert("RGB"))
    want = np.asarray(Image.open(folder / "expected.png").convert("RGB"))
    if got.shape != want.shape or not np.array_equal(got, want):
        print(f"the installed package's image differs from the checkout's: {got.shape} vs {want.shape}")
        return 1
    print(f"the installed package's image equals the checkout's ({got.shape[1]}x{got.shape[0]})")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--compare", type=Path)
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(args.folder, args.compare))
    make(args.folder)
