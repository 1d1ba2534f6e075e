#!/usr/bin/env python3
"""TRL 1.16's KL dataset over several blocks, for KTOTests.mismatchedRows: seven unpaired rows prepared by KTOTrainer
with per_device_train_batch_size 3 (blocks of 3, 3 and a short last one of 1), the same tiny model and word-level
tokenizer as make_kto_fixture.py; each row's prompt_ids, completion_ids and KL_completion_ids as TRL's
_prepare_dataset leaves them. Writes Tests/QLoRATrainingTests/Resources/kto_kl_blocks.json.
"""
import json
import os
import tempfile
import warnings

import trl
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import KTOConfig, KTOTrainer

warnings.filterwarnings("ignore")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRATrainingTests", "Resources")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
vocab = {(SPECIAL[i] if i < 4 else f"w{i}"): i for i in range(320)}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
words = lambda ids: " ".join(f"w{i}" for i in ids)
rows = [([10 + i, 20 + i], [100 + i] * (1 + i % 3), i % 2 == 0) for i in range(7)]
data = Dataset.from_list([{"prompt": words(p), "completion": " " + words(c), "label": lab} for p, c, lab in rows])
model = AutoModelForCausalLM.from_pretrained(os.path.join(RES, "tiny-llama-train"))
config = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules=["q_proj"])
args = KTOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=3, report_to="none", use_cpu=True, bf16=False,
                 dataset_num_proc=None)
trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=config)
out = [{k: trainer.train_dataset[i][k] for k in ["prompt_ids", "completion_ids", "KL_completion_ids", "label"]} for i in range(len(rows))]
json.dump({"generator": "scripts/reference/make_kto_blocks_fixture.py", "trl": trl.__version__, "block_size": 3, "rows": out},
          open(os.path.join(RES, "kto_kl_blocks.json"), "w"), indent=1)
print(json.dumps(out))
