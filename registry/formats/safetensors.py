"""Strict safetensors header parser (pure: bytes in, dataclasses or errors out).

INTERFACE (fixed; other modules code against it):

    MAX_HEADER_SIZE_DEFAULT = 8 * 1024 * 1024
    DTYPE_SIZES: dict[str, int]         # bytes per element, e.g. {"F32": 4, "BF16": 2, ...}
    FLOAT_DTYPES: frozenset[str]

    @dataclass(frozen=True)
    class TensorInfo:
        name: str
        dtype: str
        shape: tuple[int, ...]
        start: int   # offset in the data section (after 8 + header_size)
        end: int
        @property nbytes -> int
        @property numel -> int

    @dataclass(frozen=True)
    class Header:
        tensors: dict[str, TensorInfo]      # in data-offset order
        metadata: dict[str, str] | None
        header_size: int                    # N, the JSON length
        @property data_offset -> int        # 8 + N
        @property data_size -> int          # end of the last tensor (0 if none)
        @property file_size -> int          # data_offset + data_size

    def header_length(prefix: bytes, *, max_header_size=MAX_HEADER_SIZE_DEFAULT) -> int
    def parse_header(header_json: bytes, *, file_size: int | None = None) -> Header
    def read_header(read_range: Callable[[int, int], bytes], file_size: int, *,
                    max_header_size=MAX_HEADER_SIZE_DEFAULT) -> Header
    def read_header_from_file(path, *, max_header_size=...) -> Header
"""
