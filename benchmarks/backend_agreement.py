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
    for r in rows:
        print(f"{r['dtype']:>9}: greedy identical {sum(r['greedy_identical'])}/{r['num_prompts']}, "
              f"prompt logprob max|d| {r['prompt_logprob_max_abs_diff']:.2e} mean {r['prompt_logprob_mean_abs_diff']:.2e}, "
              f"sample logprob max|d| {r['sample_logprob_max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
