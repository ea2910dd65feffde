"""loreg's LoRA resolver for vLLM: a request naming ``ns/name:prod`` loads that adapter from loreg.

vLLM finds it through the ``vllm.general_plugins`` entry point (``loreg``, see pyproject.toml) and
calls ``register()``, which registers the resolver under the name ``loreg``. With
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true`` vLLM then asks it for any adapter a request names that it
has not loaded. vLLM is imported only inside ``register()``; nothing of the server is imported.

The resolver pins the reference to an immutable version (public ``Client.resolve``), checks it
against the served base by content and against what vLLM can load, and publishes the verified
files into ``LOREG_VLLM_CACHE_DIR/<manifest hex>/`` by an atomic rename (``Client.pull`` into a
private folder beside it, itself through the content-addressed cache and its per-digest locks), so
several vLLM processes can share one cache and two names of the same bytes share one folder.

It never raises into vLLM (vLLM answers a raised exception with a 500 and skips the resolvers
after it): any refusal or failure returns None and logs one line naming the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loreg.cli import config

if TYPE_CHECKING:
    from loreg.cli.client import RegistryClient, ResolvedVersion

RESOLVER_NAME = "loreg"
# vLLM's default --max-lora-rank; the resolver cannot see the value vLLM was started with
DEFAULT_MAX_LORA_RANK = 16
CHUNK = 1 << 20

logger = logging.getLogger("loreg.vllm")


class Refused(Exception):
    """A reference that this vLLM must not load; the message is the reason logged."""


def cache_dir() -> Path:
    env = os.environ.get("LOREG_VLLM_CACHE_DIR")
    return Path(env) if env else config.loreg_home() / "vllm"


def max_lora_rank() -> int:
    raw = os.environ.get("LOREG_VLLM_MAX_LORA_RANK", "")
    if not raw:
        return DEFAULT_MAX_LORA_RANK
    if not raw.isdigit() or int(raw) < 1:
        logger.warning("loreg: LOREG_VLLM_MAX_LORA_RANK=%r is not a positive integer; using %d", raw[:20], DEFAULT_MAX_LORA_RANK)
        return DEFAULT_MAX_LORA_RANK
    return int(raw)


def serving_refusal(version: ResolvedVersion, max_rank: int) -> str | None:
    """Why vLLM (started with ``--max-lora-rank max_rank``) would refuse this version, or None."""
    cfg, facts = version.config, version.facts
    pattern = cfg.get("rank_pattern") or {}
    ranks = [facts.get("r") or cfg.get("r") or 0, *facts.get("ranks", []), *(pattern.values() if isinstance(pattern, dict) else [])]
    rank = max(int(r) for r in ranks if isinstance(r, int | float))
    if rank > max_rank:
        return (f"rank {rank} exceeds the max LoRA rank {max_rank} (set LOREG_VLLM_MAX_LORA_RANK to vLLM's "
                f"--max-lora-rank, at least {rank})")
    if facts.get("use_dora") or cfg.get("use_dora"):
        return "it uses DoRA, which vLLM does not load"
    if facts.get("has_bias") or cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        return "it trains biases (bias / lora_bias), which vLLM does not load"
    return None


class AdapterResolver:
    """The resolver without vLLM: reference -> checked, verified, published folder."""

    def __init__(self, client: RegistryClient | None = None, *, cache: Path | None = None, max_rank: int | None = None):
        self._client = client
        self.cache = cache or cache_dir()
        self.max_rank = max_rank if max_rank is not None else max_lora_rank()
        self._lock = threading.Lock()
        # once per process: a folder's layout (vLLM serves one base for its whole life) and
        # registered base names (only found ones: a name registered later must be seen)
        self._folder_layouts: dict[str, str] = {}
        self._bases: dict[str, tuple[str, str]] = {}

    @property
    def client(self) -> RegistryClient:
        with self._lock:
            if self._client is None:
                from loreg.cli.client import RegistryClient

                self._client = RegistryClient()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def resolve(self, base_model_name: str, lora_name: str) -> Path | None:
        """The folder to load for ``lora_name`` on ``base_model_name``, or None (reason logged)."""
        from loreg.registry.errors import ConnectionFailedError, LoregError

        try:
            version = self.client.resolve(lora_name)
            refusal = serving_refusal(version, self.max_rank)
            if refusal:
                raise Refused(refusal)
            self._check_base(base_model_name, version)
            path = self.materialize(version)
        except Refused as exc:
            logger.warning("loreg: not loading %r on %r: %s", lora_name, base_model_name, exc)
            return None
        except ConnectionFailedError as exc:
            logger.warning("loreg: not loading %r: registry unreachable: %s", lora_name, exc.message)
            return None
        except LoregError as exc:
            logger.warning("loreg: not loading %r: %s [%s]", lora_name, exc.message, exc.code)
            return None
        except Exception as exc:  # noqa: BLE001 - vLLM must never see an exception from a resolver
            logger.warning("loreg: not loading %r: unexpected %s: %s", lora_name, type(exc).__name__, exc)
            return None
        logger.info("loreg: %r is %s (version %d) at %s", lora_name, version.ref, version.number, path)
        return path

    def _check_base(self, base_model_name: str, version: ResolvedVersion) -> None:
        if not version.base_layout_digest:
            raise Refused(f"{version.ref} records no base model")
        if os.path.isdir(base_model_name):
            layout = self._folder_layout(base_model_name)
            if layout != version.base_layout_digest:
                raise Refused(
                    f"the base folder's layout {layout[:19]}… is not the adapter's base layout "
                    f"{version.base_layout_digest[:19]}… ({', '.join(version.base_names) or 'unnamed'})"
                )
            return
        from loreg.registry.errors import BaseNotFoundError, NameInvalidError

        known = self._bases.get(base_model_name)
        if known is None:
            try:
                base = self.client.base(base_model_name)
            except (BaseNotFoundError, NameInvalidError):
                raise Refused(
                    f"base {base_model_name!r} is not registered in loreg (loreg base register DIR --name "
                    f"{base_model_name}, or serve a local folder)"
                ) from None
            known = self._bases[base_model_name] = (base["weights_digest"], base["layout_digest"])
        weights, layout = known
        if weights != version.base_weights_digest and layout != version.base_layout_digest:
            raise Refused(
                f"base {base_model_name!r} is not the adapter's base ({', '.join(version.base_names) or 'unnamed'}) "
                "and does not share its layout"
            )

    def _folder_layout(self, folder: str) -> str:
        from loreg.cli.checkpoint import layout_digest

        key = os.path.realpath(folder)
        with self._lock:
            cached = self._folder_layouts.get(key)
        if cached is None:
            try:
                cached = layout_digest(key)
            except Exception as exc:  # a folder without readable safetensors cannot be checked
                raise Refused(f"cannot read the base folder's safetensors headers: {exc}") from None
            with self._lock:
                self._folder_layouts[key] = cached
        return cached

    def materialize(self, version: ResolvedVersion) -> Path:
        """``cache/<manifest hex>/`` with every file verified; published whole by one rename."""
        hexdigest = version.digest.removeprefix("sha256:")
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise Refused(f"invalid manifest digest {version.digest[:80]!r} from the registry")
        final = self.cache / hexdigest
        if final.is_dir():
            if _verified(final, version):
                return final
            # damaged in place (a hard link edited, a disk error): move it out of the way whole
            aside = self.cache / f".damaged-{hexdigest}-{uuid.uuid4().hex}"
            try:
                os.rename(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except FileNotFoundError:
                pass  # another process moved it already
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = self.cache / f".staging-{hexdigest}-{uuid.uuid4().hex}"
        try:
            self.client.pull(version.ref, staging)
            try:
                os.rename(staging, final)
            except OSError:
                # another process published the same version first: use theirs
                if not _verified(final, version):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


def _verified(folder: Path, version: ResolvedVersion) -> bool:
    for f in version.files:
        path = folder / f.path
        try:
            if path.stat().st_size != f.size:
                return False
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
        except OSError:
            return False
        if "sha256:" + h.hexdigest() != f.digest:
            return False
    return True


def vllm_resolver(core: AdapterResolver | None = None) -> Any:
    """A vLLM ``LoRAResolver`` around ``core`` (imports vLLM)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class LoregLoRAResolver(LoRAResolver):
        def __init__(self, core: AdapterResolver):
            self.core = core

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            try:
                path = await asyncio.to_thread(self.core.resolve, base_model_name, lora_name)
                if path is None:
                    return None
                # vLLM replaces lora_int_id with its own counter; until then, one positive id per version
                lora_id = int(path.name[:15], 16) + 1
                return LoRARequest(lora_name=lora_name, lora_int_id=lora_id, lora_path=str(path), base_model_name=base_model_name)
            except Exception as exc:  # noqa: BLE001 - never raise into vLLM
                logger.warning("loreg: not loading %r: unexpected %s: %s", lora_name, type(exc).__name__, exc)
                return None

    return LoregLoRAResolver(core or AdapterResolver())


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver as ``loreg``.

    vLLM calls general plugins in every process it starts, without a try: this never raises.
    """
    try:
        from vllm.lora.resolver import LoRAResolverRegistry

        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, vllm_resolver())
    except Exception as exc:  # noqa: BLE001
        logger.warning("loreg: the vLLM LoRA resolver was not registered: %s: %s", type(exc).__name__, exc)
