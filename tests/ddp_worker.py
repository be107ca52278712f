"""Run by tests/test_train.py under `torchrun --nproc_per_node=2` (gloo), or as one process.

Three optimizer steps of train.train_step on a fixed global batch of 4 clips
and 8 images: with 2 processes each rank takes its half and accumulates over 2
micro-batches (no_sync, then an all-reduce); one process takes the whole batch
at once. Every sample has the same number of masked cells, so the mean of the
per-micro-batch losses equals the loss over the whole batch. Each rank saves
its parameters to OUT/rank{r}.pt.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT [compile]
    python tests/ddp_worker.py OUT
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT collectives
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT frozen
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT image-list
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT resume
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT ema
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

import swin3d
import tokenizer
import train
from bevt import BEVT, BEVTConfig


def global_batch():
    g = torch.Generator().manual_seed(0)
    B, N, T, S = 4, 8, 4, 64
    vmask = torch.zeros(T // 2, 4, 4, dtype=torch.bool)
    vmask[:, 1:3, 0:3] = True                                       # same count in every clip
    imask = torch.zeros(4, 4, dtype=torch.bool)
    imask[0:2, 1:4] = True
    def pixels(*shape):                                             # uint8, as data.py ships them
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return {"video": pixels(B, 3, T, S, S), "video_half": pixels(B, 3, T, S // 2, S // 2),
            "video_mask": vmask.expand(B, -1, -1, -1).clone(),
            "image": pixels(N, 3, S, S), "image_half": pixels(N, 3, S // 2, S // 2),
            "image_mask": imask.expand(N, -1, -1).clone()}


def collectives(out):
    """The trainers' cross-rank helpers under gloo: a NaN on rank 1 only must stop both ranks at the
    same step with the same message; rows of different lengths gather in rank order."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = train.all_gather_rows(torch.arange(rank + 2) + 10 * rank, True)           # 2 rows, then 3
    mean = train.all_reduce_mean(torch.tensor([float(rank)]), True)
    log = train.StepLog(os.path.join(out, "metrics.jsonl") if rank == 0 else None,
                         train.Runtime(True, rank, dist.get_world_size(), torch.device("cpu"), False))
    result = [f"rows={rows.tolist()} mean={mean.item()}"]
    for step in (1, 2, 3):
        bad = rank == 1 and step == 2
        log.add({"step": step}, {"loss": torch.tensor(float("nan") if bad else 1.0), "grad_norm": torch.tensor(1.0)})
    try:
        log.flush()
        result.append("no stop")
    except SystemExit as e:
        result.append(str(e))
    with open(os.path.join(out, f"collectives{rank}.txt"), "w") as f:
        f.write("\n".join(result) + "\n")
    dist.barrier()                                                  # both ranks got here: nobody hangs
    dist.destroy_process_group()


def frozen_rank(out):
    """Rank 1 freezes (sleeps 60 s) before a collective; rank 0, under a 0.05-minute process-group
    timeout (train.setup_distributed), must fail within seconds instead of waiting for it."""
    import time
    rank = train.setup_distributed(timeout_min=0.05)[1]
    if rank == 1:
        time.sleep(60)
    t = time.time()
    try:
        dist.all_reduce(torch.ones(1))
        result = "no timeout"
    except Exception as e:                                        # gloo: RuntimeError "... timed out ..."
        result = f"{type(e).__name__} after {time.time() - t:.0f} s"
    with open(os.path.join(out, f"timeout{rank}.txt"), "w") as f:
        f.write(result + "\n")
    os._exit(3)                                                   # as a failed rank would: torchrun ends the job


def image_list(out):
    """data.list_image_folder_once on the folder OUT/images, the list at OUT/cache/images.txt: each
    rank counts its own folder scans (the real scan, wrapped; rank 0's is held 1.5 s so that rank 1
    meets the file before rank 0 has replaced it) and writes OUT/list{rank}.json: its scans, the
    seconds the call took, the classes and the (path, label) rows its ImageDataset holds."""
    import json
    import time
    import data
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    scans, real = [], data.scan_image_folder

    def counted(root):
        scans.append(str(root))
        if rank == 0:
            time.sleep(1.5)
        return real(root)
    data.scan_image_folder = counted
    root = os.path.join(out, "images")
    t = time.time()
    path = data.list_image_folder_once(root, os.path.join(out, "cache", "images.txt"), rank=rank, poll=0.05)
    took = time.time() - t
    ds = data.ImageDataset(root, path)
    with open(os.path.join(out, f"list{rank}.json"), "w") as f:
        json.dump({"scans": len(scans), "seconds": took, "classes": ds.classes,
                   "rows": [[str(p), l] for p, l in ds.samples]}, f)
    dist.barrier()
    dist.destroy_process_group()


def resume_decision(out):
    """Rank 1 cannot see the run folder's checkpoint (NFS attribute caching: os.path.exists and isfile in
    train.py say no);
    train.claim_run_dir must still resume both ranks from rank 0's decision and file. Writes OUT/resume{rank}.txt."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_dir = os.path.join(out, "joint")
    if rank == 0:
        os.makedirs(run_dir)
        train.save_checkpoint(os.path.join(run_dir, "ckpt.pt"), {"model": {"w": torch.ones(2)}, "step": 3})
    dist.barrier()
    if rank == 1:                                   # train.py's own look at the folder says "nothing there"
        real_exists, real_isfile = os.path.exists, os.path.isfile
        os.path.exists = lambda p: sys._getframe(1).f_globals["__name__"] != "train" and real_exists(p)
        os.path.isfile = lambda p: sys._getframe(1).f_globals["__name__"] != "train" and real_isfile(p)
    cfg = train.parse_args(["--preset", "cpu", "--out", out])
    claim = train.claim_run_dir(run_dir, cfg, train.Runtime(True, rank, 2, torch.device("cpu"), False))
    with open(os.path.join(out, f"resume{rank}.txt"), "w") as f:
        f.write(f"{claim.source} {claim.ck['step']} {claim.ck['model']['w'].tolist()} {sorted(claim.there)}\n")
    if claim.lock is not None:
        claim.lock.release()
    dist.destroy_process_group()


def ema_after_broadcast(out):
    """finetune.prepare_model on 2 ranks seeded differently: DDP's start-up broadcast makes the weights equal,
    and the EMA, made after it, starts equal too. Writes OUT/ema{rank}.pt (its own init, the model, the EMA)."""
    import finetune
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = finetune.resolve_config({"preset": "cpu", "init": "scratch", "ema": 0.99})
    torch.manual_seed(rank)
    own = finetune.build_model(cfg, 3).head.weight.detach().clone()
    torch.manual_seed(rank)
    raw, model, ema = finetune.prepare_model(cfg, 3, train.Runtime(True, rank, 2, torch.device("cpu"), False))
    torch.save({"own": own, "model": raw.head.weight.detach(), "ema": ema.module.head.weight.detach()},
               os.path.join(out, f"ema{rank}.pt"))
    dist.destroy_process_group()


def main(out, compiled=False):
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    torch.manual_seed(0)
    model = BEVT(BEVTConfig(swin=swin3d.get_config("cpu", drop_path_rate=0.0), vocab_size=16))
    model.set_stage("joint")
    tok = tokenizer.OfflineTokenizer(torch.rand(16, 192, generator=torch.Generator().manual_seed(1)))
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, "init.pt"))
    if compiled:
        # As train.py --compile: compile first, then wrap in DDP (DDP's graph splitting at its
        # buckets then applies). aot_eager traces exactly what inductor would get (dynamo +
        # AOTAutograd, forward and backward graphs) without minutes of C++ code generation.
        model.compile_streams(backend="aot_eager", dynamic=False)
    wrapped = train.wrap_ddp(model, torch.device("cpu")) if ddp else model
    if ddp and rank == 0:                                           # how the trainers build DDP (issue: 118 MB/forward)
        with open(os.path.join(out, "ddp_flags.txt"), "w") as f:
            f.write(f"broadcast_buffers={wrapped.broadcast_buffers} "
                    f"find_unused_parameters={wrapped.find_unused_parameters} "
                    f"gradient_as_bucket_view={wrapped.gradient_as_bucket_view}\n")
    # Plain SGD and no clipping: Adam's update and clipping are blind to the scale of the
    # gradient, which would hide a wrong reduction (a sum instead of a mean, say).
    opt = torch.optim.SGD(train.param_groups(model, 0.0), lr=0.5)
    full = global_batch()
    # Rank r's half of the batch, as 2 micro-batches (accumulation); one process: the whole batch.
    mine = {k: v.chunk(world)[rank] for k, v in full.items()}
    micro = [{k: v.chunk(2)[i] for k, v in mine.items()} for i in range(2)] if ddp else [mine]
    for _ in range(3):
        rt = train.Runtime(ddp, rank, world, torch.device("cpu"), False)
        sums, gnorm = train.train_step(wrapped, micro, tok, rt, 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2:] == ["collectives"]:
        collectives(sys.argv[1])
    elif sys.argv[2:] == ["frozen"]:
        frozen_rank(sys.argv[1])
    elif sys.argv[2:] == ["image-list"]:
        image_list(sys.argv[1])
    elif sys.argv[2:] == ["resume"]:
        resume_decision(sys.argv[1])
    elif sys.argv[2:] == ["ema"]:
        ema_after_broadcast(sys.argv[1])
    else:
        main(sys.argv[1], compiled=sys.argv[2:] == ["compile"])
