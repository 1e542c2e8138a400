"""Two-process DDP on the CPU (gloo): Lightning's own ``strategy="ddp"``, no home-made distributed code.

Lightning's DDP launcher starts the extra rank by re-running the command line, so the training runs in
a subprocess (this file as a script) and the test checks what the ranks wrote: both ranks end with the
same weights (gradients were all-reduced), each rank saw its own half of the data, and the rank-0
checkpoint exports to a directory ``AnyGen.from_pretrained`` loads. The GAN variant checks that manual
optimization with two optimizers works under ``ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()


def _run_rank(kind: str, out: Path, tok_dir: str) -> None:
    """One rank of the DDP run (both ranks execute this; Lightning sets the rank from the environment)."""
    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(HERE.parent))
    from test_trainers import GAN, _ListData, image_batches, tiny_image, tiny_unified, token_batches

    if kind == "unified":
        module = tiny_unified(tok_dir)
        items, strategy = token_batches(module.tokenizer, 8, 2), "ddp"
    else:
        module = tiny_image(**GAN)
        items, strategy = image_batches(4), "ddp_find_unused_parameters_true"

    class Record(Callback):
        def __init__(self) -> None:
            self.seen: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            first = batch["ids"] if kind == "unified" else batch["pixels"]
            self.seen.append(float(first.float().sum()))

    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[record, ModelCheckpoint(dirpath=out / "ckpt", save_last=True)])
    # Lightning gives each rank a DistributedSampler over the items (each item is a whole batch)
    trainer.fit(module, DataLoader(_ListData(items), batch_size=None))
    checksum = sum(float(p.double().sum()) for p in module.parameters())
    result = {"rank": trainer.global_rank, "world_size": trainer.world_size, "checksum": checksum,
              "seen": record.seen, "global_step": trainer.global_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unified", "image_gan"])
def test_two_process_ddp_on_cpu(kind, tmp_path):
    from anygen.api import AnyGen
    from anygen.testing import random_engine
    from trainers.export import export_checkpoint

    tok_dir = tmp_path / "tokenizer"
    random_engine("tiny").tokenizer.save(tok_dir)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": os.pathsep.join(
        [str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE), kind, str(tmp_path), str(tok_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-9)  # weights stayed in sync
    assert set(ranks[0]["seen"]).isdisjoint(ranks[1]["seen"])  # each rank trained on its own shard
    exported = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "export")
    if kind == "unified":
        AnyGen.from_pretrained(exported).generate("a red circle", max_new_tokens=4, seed=0)
    else:
        assert exported.name == "image_tokenizer.safetensors"


if __name__ == "__main__":  # a DDP rank: python tests/test_ddp.py KIND OUT_DIR TOKENIZER_DIR
    _run_rank(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
