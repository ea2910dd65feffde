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
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loreg.cli import config
from loreg.cli.serving import BaseCheck, Refused, VersionFolders, serving_refusal
from loreg.registry.errors import ConnectionFailedError, LoregError
from loreg.registry.formats.validate import VLLM_DEFAULT_MAX_LORA_RANK

if TYPE_CHECKING:
    from loreg.cli.client import RegistryClient

RESOLVER_NAME = "loreg"

logger = logging.getLogger("loreg.vllm")


def cache_dir() -> Path:
    env = os.environ.get("LOREG_VLLM_CACHE_DIR")
    return Path(env) if env else config.loreg_home() / "vllm"


def max_lora_rank() -> int:
    """LOREG_VLLM_MAX_LORA_RANK: the resolver cannot see the --max-lora-rank vLLM was started with."""
    raw = os.environ.get("LOREG_VLLM_MAX_LORA_RANK", "")
    if not raw:
        return VLLM_DEFAULT_MAX_LORA_RANK
    if not raw.isdigit() or int(raw) < 1:
        logger.warning(
            "loreg: LOREG_VLLM_MAX_LORA_RANK=%r is not a positive integer; using %d", raw[:20], VLLM_DEFAULT_MAX_LORA_RANK
        )
        return VLLM_DEFAULT_MAX_LORA_RANK
    return int(raw)


class AdapterResolver:
    """The resolver without vLLM: reference -> checked, verified, published folder (or None, logged)."""

    def __init__(self, client: RegistryClient | None = None, *, cache: Path | None = None, max_rank: int | None = None):
        self._client = client
        self._lock = threading.Lock()
        self.max_rank = max_rank if max_rank is not None else max_lora_rank()
        self.bases = BaseCheck(self.client)
        self.folders = VersionFolders(cache or cache_dir(), self.client)

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
        try:
            version = self.client().resolve(lora_name)
            refusal = serving_refusal(version, self.max_rank)
            if refusal:
                raise Refused(refusal)
            self.bases.check(base_model_name, version)
            path = self.folders.materialize(version)
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
