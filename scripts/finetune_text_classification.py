"""Fine-tune with any attention implementation (default: MultiMax). Every TrainingArguments flag works.

    .venv/bin/python scripts/finetune_text_classification.py --output_dir outputs/text_classification --do_train --do_eval --max_steps 200
    .venv/bin/python scripts/finetune_text_classification.py --help
"""

import hf_multimax  # noqa: F401  (registers the attention implementations)
from hf_multimax.training.finetune import main

if __name__ == "__main__":
    main("text_classification")
