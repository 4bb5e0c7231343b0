"""Long-range key-value retrieval with SparseMix: does a tiny model keep its dense accuracy when each
query block only sees the sink, its own block and the `top_k` blocks its learned scorer picks?

Task (`task.py`, generated, deterministic): a sequence of random filler tokens in segments of
`segment` tokens (the SparseMix block size). The first half of the segments (after segment 0, the
sink) holds key-value *pair tokens*, at most one per segment at a random offset; each pair token
combines a key and a value in one id, so one attention layer can match the key and copy the value.
The second half holds *queries*, at most one per segment at a random offset: a query token names a
key whose pair sits in a random earlier segment, and the next token is the answer (the pair's
value), the only position with a label. The needle is therefore always in another block than the
query, on average L/2 tokens back.

Recipe (`experiment.py`, `run_retrieval_experiment`): (a) train the dense (SDPA) model with a
length curriculum, (b) dense accuracy at the evaluation length on held-out sequences, (c) the same
weights with `attn_implementation="sparsemix"` and an untrained scorer, (d) dense warm-up of the
scorers only (`dense_warmup=True`, `freeze_all_but_scorers`), (e) short sparse fine-tuning of every
parameter. After (c), (d) and (e): sparse accuracy and the recall of the needle block among the
selected blocks (`measures.py`). `report.py` renders the result as the README's table.
"""

from .experiment import DIRECTION, QUICK, RetrievalExperimentArguments, run_retrieval_experiment, training_segment
from .measures import evaluate_retrieval, kl_target_needle_recall, needle_block_recall
from .long_context import long_context_suite
from .report import long_context_table, markdown_table, plot_long_context
from .task import RetrievalDataset, RetrievalTask, init_factored_embeddings, tiny_llama_config

__all__ = [
    "DIRECTION",
    "QUICK",
    "RetrievalDataset",
    "RetrievalExperimentArguments",
    "RetrievalTask",
    "evaluate_retrieval",
    "init_factored_embeddings",
    "kl_target_needle_recall",
    "long_context_suite",
    "long_context_table",
    "markdown_table",
    "needle_block_recall",
    "plot_long_context",
    "run_retrieval_experiment",
    "tiny_llama_config",
    "training_segment",
]
