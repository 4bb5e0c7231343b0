"""The result of `run_retrieval_experiment` as the README's markdown table."""

from __future__ import annotations

__all__ = ["long_context_table", "markdown_table", "plot_long_context"]


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
    if result.get("long_context"):
        lines += ["", long_context_table(result["long_context"])]
    lines.append("")
    if result.get("preset") == "direction":
        before = min(v for k, v in recall["untrained_scorer"].items() if k.endswith("_any_head"))
        after = min(v for k, v in recall["after_warmup"].items() if k.endswith("_any_head"))
        lines.append(f"DIRECTION CHECK (--direction): needle-block recall (any head) {before:.3f} untrained -> {after:.3f} "
                     f"after the warm-up ({'up' if after > before else 'NOT up'}); small model, no target claimed; "
                     f"total wall time {result['times_s']['total']:.0f} s")
    elif result.get("quick"):  # tiny sizes: the numbers only show the pipeline runs
        lines.append(f"SMOKE RUN (--quick): sparse/dense ratio {result['sparse_dense_ratio']:.3f} at tiny sizes, no target "
                     f"claimed; total wall time {result['times_s']['total']:.0f} s")
    else:
        lines.append(f"sparse/dense ratio {result['sparse_dense_ratio']:.3f} (target >= {result['target_ratio']}): "
                     f"{'met' if result['meets_target'] else 'NOT met'}; total wall time {result['times_s']['total']:.0f} s")
    return "\n".join(lines)


def _rows(lc: dict):
    for row in lc["kv_lookup"]:
        yield f"key-value lookup, L={row['length']}", row
    if lc.get("multi_query"):
        row = lc["multi_query"]
        yield f"multi-query recall, {row['needles']} needles, L={row['length']}", row
    for row in lc["depth_sweep"]:
        yield f"needle at depth {row['depth']:.0%}, L={row['length']}", row


def long_context_table(lc: dict) -> str:
    """The long-context suite (`long_context_suite`) as a markdown table."""
    lines = ["| long-context setting (sparse model after fine-tuning) | dense | sparse | sparse / dense | "
             "needle-block recall (any head / mean over heads) |", "|---|---|---|---|---|"]
    for name, row in _rows(lc):
        lines.append(f"| {name} ({row['queries']} queries) | {row['dense']:.4f} | {row['sparse']:.4f} | "
                     f"{row['ratio']:.3f} | {row['needle_recall_any_head']:.3f} / "
                     f"{row['needle_recall_mean_over_heads']:.3f} |")
    shared = (lc.get("multi_query") or {}).get("needle_recall_any_head_by_queries_in_block")
    if shared:
        lines.append("\nmulti-query needle-block recall (any head) by queries sharing the block: "
                     + ", ".join(f"{n}: {r:.3f}" for n, r in shared.items()))
    return "\n".join(lines)


def plot_long_context(result: dict, path: str) -> None:
    """Depth sweep (accuracy and needle recall vs depth) beside the lookup and multi-query bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lc = result["long_context"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = [(name.split(" (")[0], row) for name, row in _rows(lc) if "depth" not in name]
    x = range(len(bars))
    left.bar([i - 0.2 for i in x], [r["dense"] for _, r in bars], width=0.4, label="dense")
    left.bar([i + 0.2 for i in x], [r["sparse"] for _, r in bars], width=0.4, label="sparsemix")
    left.set_xticks(list(x), [n.replace(", ", "\n") for n, _ in bars], fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_ylabel("accuracy")
    left.legend()
    if lc["depth_sweep"]:
        depth = [r["depth"] * 100 for r in lc["depth_sweep"]]
        right.plot(depth, [r["dense"] for r in lc["depth_sweep"]], "o-", label="dense accuracy")
        right.plot(depth, [r["sparse"] for r in lc["depth_sweep"]], "s-", label="sparsemix accuracy")
        right.plot(depth, [r["needle_recall_any_head"] for r in lc["depth_sweep"]], "^--", label="needle-block recall")
        right.set_xlabel(f"needle depth (% of the context), L={lc['depth_sweep'][0]['length']}")
        right.set_ylim(0, 1.05)
        right.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"SparseMix ({s['selector']} selector, block {s['block_size']}, top_k {s['top_k']})"
                 + (" - SMOKE RUN, claims nothing" if result.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
