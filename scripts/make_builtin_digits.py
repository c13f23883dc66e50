"""Write `src/hf_graft/data/builtin_digits.npz`, the data of `builtin:digits`, from scikit-learn's copy.

The 1,797 8x8 handwritten digits of the UCI "Optical Recognition of Handwritten Digits" test set
(CC BY 4.0, see builtin_digits.LICENSE beside the file), as scikit-learn ships them: pixel counts
0..16 and their labels, stored as uint8. hf_graft ships the file, so that the quickstart needs no
scikit-learn; tests/test_data.py checks that it still equals scikit-learn's copy.

    pip install scikit-learn && python scripts/make_builtin_digits.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

TARGET = Path(__file__).resolve().parents[1] / "src" / "hf_graft" / "data" / "builtin_digits.npz"


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    if not np.array_equal(images, digits.images) or images.shape != (1797, 8, 8):
        raise SystemExit("scikit-learn's digits are not 1,797 8x8 images of whole numbers 0..16")
    np.savez_compressed(TARGET, images=images, labels=digits.target.astype(np.uint8))
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
