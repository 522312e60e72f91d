"""autoplan runtime: executes a Plan under torchrun with PyTorch's native distributed engines.

    torchrun --nproc-per-node 8 -m runtime.launch plan.yaml --model gpt-small --steps 100

Multi-node (one command per node, same rendezvous endpoint; RANK 0's host serves it):

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 --rdzv-id job1 -m runtime.launch plan.yaml --model gpt-small
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 --rdzv-id job1 -m runtime.launch plan.yaml --model gpt-small

The plan's pp * dp * tp must equal nnodes * nproc-per-node (tp innermost stays inside a node).

Fault tolerance: add `--max-restarts N` to torchrun and `--checkpoint-dir D --checkpoint-every K`
to runtime.launch; a restarted attempt resumes from the newest committed checkpoint by itself
(at most K steps redone), `--timeout-s` bounds the wait for a dead or hung peer, and a
checkpoint loads under any other plan (runtime/checkpoint.py: commit protocol, trust boundary).
Python: `pm = runtime.parallelize(model, plan, loss_fn=..., optimizer_fn=..., lr_scheduler_fn=...,
max_grad_norm=...)`, then `for batch in pm.data_loader(dataset): pm.train_step(batch)`;
`pm.eval_step(batch)`, `pm.export_full_state_dict("model.safetensors")` (README: "Bring your own
model and loop", executed by tests/test_readme_byom.py).
"""

from runtime.parallelize import ParallelModel, parallelize, validate_model

__all__ = ["ParallelModel", "parallelize", "validate_model"]
