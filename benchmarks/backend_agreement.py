"""Record how closely Triton attention agrees with the torch reference on SmolLM2 (GPU).

    python benchmarks/backend_agreement.py --out result.json
"""
import argparse

from braid.bench.backend_agreement import compare
from braid.bench.run_info import run_info, write_result
from braid.transformers_utils import default_model_path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    model = default_model_path()
    rows = [compare(model, dtype) for dtype in ("float32", "bfloat16")]
    write_result(args.out, dict(benchmark="backend_agreement", **run_info(), model="SmolLM2-135M-Instruct Q4_1 GGUF",
                                results=rows))
    def line(name, d):
        print(f"{name:>24}: greedy identical {sum(d['greedy_identical'])}/{len(d['greedy_identical'])}, "
              f"prompt logprob max|d| {d['prompt_logprob_max_abs_diff']:.2e} mean {d['prompt_logprob_mean_abs_diff']:.2e}, "
              f"sample max|d| {d['sample_logprob_max_abs_diff']:.2e}")

    for r in rows:
        line(f"{r['dtype']} triton vs torch", r)
        for key in ("torch_vs_float32", "triton_vs_float32"):
            if key in r:
                line(f"bf16 {key}", r[key])


if __name__ == "__main__":
    main()
