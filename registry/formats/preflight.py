"""The body of a preflight validation (``POST …/versions:validate``): what the server needs to
validate an adapter against its base before any file is uploaded, and no more.

    u64 little-endian C | C bytes of adapter_config.json | the first 8 + N bytes of
    adapter_model.safetensors (its length prefix and its N-byte JSON header)

Bounded by 16 + the config size limit + the header size limit; a JSON body would hold the header
as an escaped string and the 1 MiB JSON limit would refuse the headers of large adapters.
"""

from __future__ import annotations

from loreg.registry.errors import ConfigTooLargeError, RequestInvalidError
from loreg.registry.formats import safetensors


def pack(config: bytes, safetensors_prefix: bytes) -> bytes:
    return len(config).to_bytes(8, "little") + config + safetensors_prefix


def max_body(max_config_size: int, max_header_size: int) -> int:
    return 16 + max_config_size + max_header_size


def config_length(body: bytes, *, max_config_size: int) -> int:
    """The config length a preflight body starts with, refused over ``max_config_size``."""
    if len(body) < 8:
        raise RequestInvalidError("a preflight body starts with the 8-byte length of adapter_config.json")
    c = int.from_bytes(body[:8], "little")
    if c > max_config_size:
        raise ConfigTooLargeError(
            f"adapter_config.json is {c} bytes, over the limit of {max_config_size}", detail={"limit": max_config_size}
        )
    return c


def unpack(body: bytes, *, max_config_size: int, max_header_size: int) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, safetensors prefix) from a preflight body, parsed strictly:
    the prefix must end exactly where its header does.

    Raises:
        RequestInvalidError, ConfigTooLargeError, HeaderTooLargeError, HeaderInvalidError
    """
    c = config_length(body, max_config_size=max_config_size)
    if 8 + c > len(body):
        raise RequestInvalidError(f"the body ends inside adapter_config.json ({c} bytes declared)")
    config, prefix = body[8 : 8 + c], body[8 + c :]
    n = safetensors.header_length(prefix[:8], max_header_size=max_header_size)
    if len(prefix) != 8 + n:
        raise RequestInvalidError(
            f"the body must end with the safetensors header: {8 + n} bytes expected after the config, "
            f"{len(prefix)} sent",
            detail={"expected": 8 + n, "received": len(prefix)},
        )
    return config, prefix
