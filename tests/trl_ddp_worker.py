"""One process of the DDP check in tests/test_trl_train_mode.py (run under `accelerate launch`):
3 DPO steps of a float64 tiny GPT-2 with TrainEntanglementCallback; each process writes its own
rows, and checks every micro-batch's rows against gesim.probe's reference backend on its own
batch and parameters (the per-row products are local: DDP averages parameter gradients only)."""

import copy
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from trl import DPOConfig, DPOTrainer

from gesim import lm, probe
from gesim.integrations.trl_train import TrainEntanglementCallback
from gesim.probe import toy


def main(out: Path):
    torch.manual_seed(0)
    tok = toy.build_tokenizer()
    model = toy.build_model("gpt2", vocab_size=len(tok), d=16).double()
    fresh = copy.deepcopy(model)
    args = DPOConfig(output_dir=str(out / "trainer"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=args,
                         train_dataset=datasets.Dataset.from_list(toy.toy_rows(16, seed=1)), processing_class=tok)
    TrainEntanglementCallback(out_dir=out / "pairs").attach(trainer)
    seen, inner = [], trainer.training_step

    def step(model, inputs, *a, **k):
        seen.append(({n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                     {k: v.clone() for k, v in inputs.items()}))
        return inner(model, inputs, *a, **k)

    trainer.training_step = step
    trainer.train()
    rank, world = trainer.args.process_index, trainer.args.world_size
    worst = 0.0
    for s, (state, inputs) in enumerate(seen, start=1):
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                p.copy_(state[n])
        ids, comp = inputs["input_ids"], inputs["completion_mask"]
        B = len(ids) // 2
        ref = probe.pair_stats(fresh, lm.PairBatch(ids[:B], ids[B:], comp[:B], comp[B:]), backend="reference")
        worst = max(worst, _compare(out / "pairs", rank, s, ref))
    info = {"rank": rank, "world": world, "worst": worst, "steps": len(seen),
            "wrapped": type(trainer.model_wrapped).__name__,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "first_ids": seen[0][1]["input_ids"][0].tolist(),
            "logged": [r.get("entanglement/train_pairs") for r in trainer.state.log_history if "loss" in r]}
    (out / f"rank{rank}.json").write_text(json.dumps(info))


def _compare(folder, rank, step, ref):
    from gesim.output import read_rows

    t = read_rows(folder)
    sel = (t["rank"] == rank) & (t["step"] == step)
    err = 0.0
    for key in ("ip", "nw2", "nl2"):
        want = ref[key].numpy()
        err = max(err, float(np.max(np.abs(t[key][sel] - want)) / np.abs(want).max()))
    return err


if __name__ == "__main__":
    main(Path(sys.argv[1]))
