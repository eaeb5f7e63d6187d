"""Why the post's "most probable" numbers differ from ours: the same per-copy logits under three formulas.

    python scripts/most_probable_formulas.py              # experiments 1-3, the whole 50,000-digit test split
    python scripts/most_probable_formulas.py --digits 2000

For each experiment's published ViT and the C16 copies of the test digits, the logits ``z_t`` of every copy go
through (a) the library's ``most_probable`` (the original code at its published commit: softmax at temperature
T // 2 = 8, product over the copies, computed in log space), (b) that formula as the original computes it, a float32
product, and (c) the formula of the original code on the day the post's result files were committed (2024-05-18):
no temperature, a float32 product of 16 softmaxes. In (c) a digit whose product underflows to 0 for every class
gets 0 / 0 = NaN logits, and ``argmax`` of a NaN row is class 0, as in the original's accuracy; one NaN row also
makes a training batch's loss NaN, which is why head finetuning with that formula ends at the share of zeros.
The embeddings come from the ``tables`` profile's cache of notebooks 06-08 when it is there (same digits, same
weights), else they are computed (700 images/s on a 2-core CPU: ~20 min per experiment for the whole split).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gevit_lib.data import evenly_spaced, take_subset
from gevit_lib.notebook import published_model, rotated_digits
from gevit_lib.posthoc import EmbeddingCache, PostHoc
from gevit_lib.post_results import post_result

EXPERIMENTS = [("rotmnist", "vit_rotmnist", "06_posthoc_rotmnist"),
               ("mnist_to_rotmnist", "vit_mnist", "07_posthoc_mnist_to_rotmnist"),
               ("low_data", "vit_rotmnist_10pct", "08_posthoc_low_data")]


def product_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The original's float32 "most probable": prod_t softmax(z_t / temperature), renormalised, as logits."""
    mle = torch.softmax(z.float() / temperature, dim=2).prod(dim=1)  # [N, classes]; 0 where it underflows
    mle = mle / mle.sum(dim=1, keepdim=True)  # 0 / 0 = NaN where every class underflowed
    return torch.log(mle + 1e-8) - torch.log(1 - mle + 1e-8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, default=None, help="evenly spaced test digits (default: all)")
    parser.add_argument("--experiments", nargs="*", default=[e for e, _, _ in EXPERIMENTS],
                        choices=[e for e, _, _ in EXPERIMENTS])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the notebooks' run dirs are")
    args = parser.parse_args()
    print("| experiment | digits | library (T // 2, log space) | original at T // 2 (float32) | "
          "2024-05-18 formula (no temperature) | its NaN rows | post |\n|---|---|---|---|---|---|---|")
    for experiment, checkpoint, notebook in [e for e in EXPERIMENTS if e[0] in args.experiments]:
        backbone, _ = published_model(checkpoint, "tables")
        test_ds, source = rotated_digits("test", "tables")
        n = args.digits or len(test_ds)
        test = take_subset(test_ds, evenly_spaced(len(test_ds), n))
        cache = EmbeddingCache({"test": test}, batch_size=512, progress=True,
                               directory=args.runs / notebook / "tables" / "embeddings")
        wrapper = PostHoc(backbone, "most_probable", "C16").eval()
        with torch.no_grad():
            emb, labels = cache(wrapper, "test")  # [N, 16, D], [N]
            z = wrapper.head(emb)  # [N, 16, classes]: each copy's logits
            library = wrapper(emb).argmax(1)
            ours32, old = product_logits(z, z.shape[1] // 2), product_logits(z, 1.0)
        nan_rows = old.isnan().all(1)
        acc = [100 * (p == labels).float().mean().item() for p in (library, ours32.argmax(1), old.argmax(1))]
        post = post_result(experiment, "none", "most_probable")
        print(f"| {experiment} ({checkpoint}) | {n} {source.split(',')[0]} | {acc[0]:.2f} | {acc[1]:.2f} | "
              f"{acc[2]:.2f} | {100 * nan_rows.float().mean().item():.2f}% | {post.test_acc} |", flush=True)


if __name__ == "__main__":
    main()
