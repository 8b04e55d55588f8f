"""The client state store: per-client tensors that survive rounds (control variates, optimizer
state), for client algorithms that declare ``stateful = True``.

Where it lives: on disk, in ``<output_dir>/client_state/client_CCCCCC/round_RRRRR.safetensors``
-- the state client C had after round R. A client may be trained by a different rank (or node)
every round, so its state must be reachable from every rank; the run directory is, as it
already is for resuming from checkpoints. Each rank holds in memory only the state of the client
it is training, so memory does not grow with the number of clients; the disk holds
C x (state size) x (versions kept).

Why versions: a checkpoint of round R must see every client's state as of round R even after
later rounds wrote newer ones. Reading at round r takes the newest version written after a round
<= r; resuming from a checkpoint of round R deletes the versions newer than R (``truncate``), so a
resumed run equals an uninterrupted one; ``prune`` drops versions that no kept checkpoint can
need. Writes are atomic (temporary file, fsync, rename) and verified like checkpoints: each file
records the SHA-256 of its tensors (the safetensors header's metadata) and a read checks it, so a
corrupt, truncated or missing file is an error naming the client, the round and the file rather
than a traceback or, worse, a silent fresh start.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fedrun.errors import CheckpointError

STATE_DIR = "client_state"
_VERSION = re.compile(r"round_(\d{5,})\.safetensors$")


class ClientStateStore:
    def __init__(self, run_dir: Path):
        self.root = Path(run_dir) / STATE_DIR

    def _client_dir(self, client: int) -> Path:
        return self.root / f"client_{client:06d}"

    def _versions(self, client: int) -> List[int]:
        folder = self._client_dir(client)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_VERSION.match, os.listdir(folder)) if m)

    def path(self, client: int, done_rounds: int) -> Path:
        return self._client_dir(client) / f"round_{done_rounds:05d}.safetensors"

    def load(self, client: int, global_round: int,
             expected: Optional[int] = None) -> Optional[Dict[str, torch.Tensor]]:
        """The state client ``client`` had before round ``global_round`` (0-based), or None when
        it has none yet. ``expected``: the round (1-based) whose state the run knows the client
        stored last; a store without that version is a CheckpointError."""
        older = [v for v in self._versions(client) if v <= global_round]
        if expected is not None and (not older or older[-1] != expected):
            raise CheckpointError(
                f"client state of client {client} after round {expected} is missing: "
                f"'{self.path(client, expected)}' (needed by round {global_round + 1}; the run "
                "directory must hold every client's newest state file)")
        if not older:
            return None
        return self._read(client, older[-1])

    def _read(self, client: int, version: int) -> Dict[str, torch.Tensor]:
        from safetensors import safe_open

        path = self.path(client, version)
        where = f"client state of client {client} after round {version} ('{path}')"
        try:
            with safe_open(str(path), framework="pt") as handle:
                recorded = (handle.metadata() or {}).get("sha256")
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # safetensors raises its own error types on a damaged file
            raise CheckpointError(f"{where} cannot be read (corrupt or truncated): {exc}") from None
        if recorded is None:
            raise CheckpointError(f"{where} records no SHA-256: it was not written by this store")
        if _content_hash(state) != recorded:
            raise CheckpointError(f"{where} is corrupt: its SHA-256 differs from the one recorded "
                                  "when it was written")
        return state

    def save(self, client: int, done_rounds: int, state: Dict[str, torch.Tensor]) -> None:
        """Store the state client ``client`` has after round ``done_rounds`` (1-based), with the
        SHA-256 of its tensors in the file's metadata."""
        from safetensors.torch import save_file

        folder = self._client_dir(client)
        folder.mkdir(parents=True, exist_ok=True)
        final = self.path(client, done_rounds)
        tmp = folder / f".{final.name}.tmp-{os.getpid()}"
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp), metadata={"sha256": _content_hash(tensors),
                                               "client": str(client), "round": str(done_rounds)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)

    def newest_versions(self, done_rounds: int) -> Dict[int, int]:
        """client -> its newest stored version at or before ``done_rounds``."""
        out = {}
        for client in self.clients():
            older = [v for v in self._versions(client) if v <= done_rounds]
            if older:
                out[client] = older[-1]
        return out

    def clients(self) -> List[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name.split("_")[1]) for p in self.root.iterdir()
                      if p.name.startswith("client_"))

    def truncate(self, done_rounds: int) -> None:
        """Forget every version written after round ``done_rounds`` (resuming from it)."""
        for client in self.clients():
            for version in self._versions(client):
                if version > done_rounds:
                    (self._client_dir(client) / f"round_{version:05d}.safetensors").unlink()

    def prune(self, oldest_needed_round: int, clients: Optional[List[int]] = None) -> None:
        """Keep, per client (default: every client), the newest version at or before
        ``oldest_needed_round`` and all later ones (what the oldest kept checkpoint, and every
        later one, reads)."""
        for client in self.clients() if clients is None else clients:
            older = [v for v in self._versions(client) if v <= oldest_needed_round]
            for version in older[:-1]:
                (self._client_dir(client) / f"round_{version:05d}.safetensors").unlink(missing_ok=True)

    def nbytes(self) -> int:
        """Bytes on disk (all clients, all versions)."""
        if not self.root.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.root.rglob("*.safetensors"))

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _content_hash(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (CPU), in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
