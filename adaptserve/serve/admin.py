"""`/admin/adapters`: load and unload PEFT LoRA adapters at runtime (transformers backend).

A request names a directory, so it is checked hard before anything reads it: it must resolve (after `..` and
symlinks) inside one of the configured `--adapter-dir`s, hold safetensors weights that resolve there too, and
hold no pickle files (`.bin`, `.pt`, ...), which can run code when loaded. Authentication for `/admin/*` is
the server's, by path prefix; nothing here checks who asks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Response

from adaptserve.export.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adaptserve.serve.errors import APIError, invalid
from adaptserve.serve.hf_engine import ADAPTER_NAME, AdapterError
from adaptserve.serve.pool import ModelPool
from adaptserve.serve.schema import AdapterCard, AdapterList, AdapterLoadRequest

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def allowed_path(raw: str, roots: list[Path]) -> Path:
    """The adapter directory `raw` names, if it lies inside one of `roots` and holds only a safetensors adapter."""
    if not roots:
        raise APIError(
            403, "runtime adapter loading is off: start the server with --adapter-dir", "invalid_request_error", "forbidden"
        )
    for root in (r.resolve() for r in roots):
        path = (root / raw).resolve()  # an absolute `raw` replaces root
        if path.is_dir() and path.is_relative_to(root):
            break
    else:
        raise invalid(
            f"adapter path {raw!r} is not a directory inside the configured adapter directories", "path_not_allowed", "path"
        )
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise invalid(f"only safetensors adapters are accepted; {raw!r} holds {pickles}", "unsafe_format", "path")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file() or not (path / name).resolve().is_relative_to(root):
            raise invalid(f"adapter {raw!r} needs {name} inside the adapter directory", "invalid_adapter", "path")
    return path


def admin_router(pool: ModelPool, adapter_dirs: list[Path]) -> APIRouter:
    router = APIRouter(prefix="/admin/adapters", tags=["admin"])

    def card(name: str) -> AdapterCard:
        base, path = pool.adapter_source(name)
        return AdapterCard(id=name, base=base, path=str(path))

    @router.get("", response_model=AdapterList)
    async def list_adapters() -> AdapterList:
        return AdapterList(data=[card(name) for name in pool.adapter_names])

    @router.post("", response_model=AdapterCard, status_code=201)
    async def load_adapter(req: AdapterLoadRequest) -> AdapterCard:
        if not ADAPTER_NAME.match(req.name):
            raise invalid(f"name must match {ADAPTER_NAME.pattern}", param="name")
        if req.name in pool.names:
            raise APIError(409, f"model {req.name!r} is served already", "invalid_request_error", "name_taken", "name")
        path = allowed_path(req.path, adapter_dirs)
        try:  # seconds of file reading and module surgery: off the event loop
            await asyncio.to_thread(pool.add_adapter, req.name, path)
        except AdapterError as err:
            raise invalid(str(err), "invalid_adapter", "path") from None
        return card(req.name)

    @router.delete("/{name}", status_code=204)
    async def unload_adapter(name: str) -> Response:
        if name not in pool.adapter_names:
            raise APIError(
                404, f"no adapter named {name!r}; adapters: {pool.adapter_names}", "invalid_request_error", "adapter_not_found"
            )
        await asyncio.to_thread(pool.remove_adapter, name)
        return Response(status_code=204)

    return router
