"""Publish a fine-tuned model folder (MultiMax, SparseMix or any plugin method) to the Hub with its
method's model card.

    .venv/bin/python scripts/publish.py outputs/text user/my-multimax-model --dry-run --local-dir outputs/upload
    .venv/bin/python scripts/publish.py outputs/text user/my-multimax-model --private

The token comes from --token, HF_TOKEN or `hf auth login`. --dry-run writes exactly the
folder that would be uploaded (to --local-dir) and prints the calls that would be made. What the
training run recorded in its own README.md (base model, data, hardware, training arguments), its
eval_results.json and the last training log of trainer_state.json go into the card; the card never
describes the machine that publishes.
"""

import argparse
import json
from pathlib import Path

import transformers
from huggingface_hub import ModelCard

import hf_multimax  # noqa: F401  (registers the attention implementations)
from hf_multimax.hub import publish
from hf_multimax.hub.card import last_training_values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a save_pretrained folder (e.g. a finetune script's --output_dir)")
    parser.add_argument("repo_id", help="user/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` one)")
    parser.add_argument("--local-dir", default=None, help="stage the upload folder here (default: a temp dir)")
    parser.add_argument("--dry-run", action="store_true", help="stage the folder, print the calls, upload nothing")
    parser.add_argument("--base_model", default=None,
                        help="the model it was fine-tuned from (default: what the run's README.md records)")
    parser.add_argument("--training_data", default=None,
                        help="free text describing the training data (default: what the run's README.md records)")
    parser.add_argument("--dataset_id", default=None, help="a Hub dataset id, for the card's metadata")
    parser.add_argument("--hardware", default=None,
                        help="what it was trained on (default: what the run's README.md records, else 'not recorded')")
    args = parser.parse_args(argv)

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        parser.error(f"model_dir {str(model_dir)!r} is not a save_pretrained folder (no config.json there); pass the "
                     "--output_dir of a fine-tuning run")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    architecture = (config.architectures or ["AutoModel"])[0]
    model = getattr(transformers, architecture).from_pretrained(model_dir)
    tokenizer = None
    if (model_dir / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    recorded = {}
    if (model_dir / "README.md").exists():  # the card the fine-tuning run wrote: what it trained from and on
        recorded = ModelCard.load(model_dir / "README.md").data.to_dict()
    eval_results = None
    for name in ("eval_results.json", "all_results.json"):
        if (model_dir / name).exists():
            eval_results = {k: v for k, v in json.loads((model_dir / name).read_text()).items() if k.startswith("eval_")}
            break
    training_log = None
    if (model_dir / "trainer_state.json").exists():  # the last training log: loss and auxiliary terms
        state = json.loads((model_dir / "trainer_state.json").read_text())
        training_log = last_training_values(state.get("log_history"))
    plan = publish(
        model, args.repo_id, tokenizer=tokenizer, private=args.private, token=args.token, local_dir=args.local_dir,
        dry_run=args.dry_run, base_model=args.base_model or recorded.get("base_model"),
        training_data=args.training_data or recorded.get("training_data"),
        dataset_id=args.dataset_id or next(iter(recorded.get("datasets") or []), None), eval_results=eval_results,
        hardware=args.hardware or recorded.get("training_hardware"),
        training_args=recorded.get("training_arguments"),
        training_log=training_log,
    )
    print(json.dumps(plan, indent=2))


if __name__ == "__main__":
    main()
