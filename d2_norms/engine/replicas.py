"""Check that data-parallel replicas hold the same weights (they must, after DDP steps)."""
import hashlib
import logging

import torch
from detectron2.utils import comm

logger = logging.getLogger("d2_norms.replicas")


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter, by name, bitwise. Buffers are left out: per-GPU BN running
    statistics legitimately differ between ranks (broadcast_buffers=False, as in the papers)."""
    model = getattr(model, "module", model)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas_identical(model: torch.nn.Module) -> str:
    """All-gather each rank's fingerprint; raise if any rank differs. Returns the fingerprint."""
    mine = state_fingerprint(model)
    if comm.get_world_size() == 1:
        return mine
    everyone = comm.all_gather(mine)
    if len(set(everyone)) != 1:
        raise RuntimeError("data-parallel replicas diverged: weight fingerprints per rank "
                           f"{everyone}")
    logger.info("All %d replicas hold identical weights (sha256 %s)", len(everyone), mine[:16])
    return mine
