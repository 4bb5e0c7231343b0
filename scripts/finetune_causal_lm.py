"""Fine-tune with any attention implementation (default: MultiMax). Every TrainingArguments flag works.

    .venv/bin/python scripts/finetune_causal_lm.py --output_dir outputs/causal_lm --do_train --do_eval --max_steps 200
    .venv/bin/python scripts/finetune_causal_lm.py --output_dir outputs/sm --do_train --attn_implementation sparsemix
    .venv/bin/python scripts/finetune_causal_lm.py --help
"""

import hf_multimax  # noqa: F401  (registers the attention implementations)
from hf_multimax.training.finetune import main

if __name__ == "__main__":
    main("causal_lm")
