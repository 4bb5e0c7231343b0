"""The result of `run_retrieval_experiment` as the README's markdown table."""

from __future__ import annotations

__all__ = ["markdown_table"]


def markdown_table(result: dict) -> str:
    acc, recall = result["accuracy"], result["needle_block_recall"]
    s = result["settings"]
    rows = [
        ("dense (SDPA)", acc["dense"], None),
        ("sparsemix, untrained scorer", acc["sparse_untrained_scorer"], recall["untrained_scorer"]),
        ("sparsemix, after scorer warm-up", acc["sparse_after_warmup"], recall["after_warmup"]),
        ("sparsemix, after sparse fine-tuning", acc["sparse_after_finetune"], recall["after_finetune"]),
    ]
    lines = [
        (f"L={s['eval_length']}, block {s['block_size']}, top_k {s['top_k']} "
         f"({result['task']['kept_blocks_per_query_block']} key blocks kept), "
         f"{s['eval_sequences']} held-out sequences x {result['task']['eval_queries_per_sequence']} queries, "
         f"chance {result['task']['chance_accuracy']:.3f}"),
        "",
        "| model | accuracy | / dense | needle-block recall (mean over heads / any head) |",
        "|---|---|---|---|",
    ]
    for name, value, rec in rows:
        ratio = value / acc["dense"] if acc["dense"] else float("nan")
        if rec is None:
            rec_text = "all blocks"
        else:
            layers = sorted({k.split("_")[0] for k in rec})
            rec_text = "; ".join(f"{l}: {rec[l + '_mean_over_heads']:.3f} / {rec[l + '_any_head']:.3f}" for l in layers)
        lines.append(f"| {name} | {value:.4f} | {ratio:.3f} | {rec_text} |")
    oracle = result["kl_target_needle_recall"]
    lines.append("")
    lines.append("Needle-block recall of a scorer that matched its KL target exactly (dense model; mean over heads / "
                 "any head): " + "; ".join(
                     f"{name} {oracle[f'layer0_{key}_mean_over_heads']:.3f} / {oracle[f'layer0_{key}_any_head']:.3f}"
                     for key, name in (("mean", "mean over the block's rows"),
                                       ("max", "max over the rows (SparseMix's KL target)"),
                                       ("query_row", "the query token's row alone"))))
    lines.append("")
    if result.get("quick"):  # tiny sizes: the numbers only show the pipeline runs
        lines.append(f"SMOKE RUN (--quick): sparse/dense ratio {result['sparse_dense_ratio']:.3f} at tiny sizes, no target "
                     f"claimed; total wall time {result['times_s']['total']:.0f} s")
    else:
        lines.append(f"sparse/dense ratio {result['sparse_dense_ratio']:.3f} (target >= {result['target_ratio']}): "
                     f"{'met' if result['meets_target'] else 'NOT met'}; total wall time {result['times_s']['total']:.0f} s")
    return "\n".join(lines)
