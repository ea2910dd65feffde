"""Every error loreg answers with, and its HTTP status: one table, shared by server and client.

The server turns a LoregError into the envelope
``{"errors": [{"code": ..., "message": ..., "detail": {...}}], "request_id": ...}`` with the class's status;
the client turns the envelope back into the same class (``error_from_envelope``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class LoregError(Exception):
    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500
    # the server's id of the request that failed (client side), for the user to quote
    request_id: str | None = None

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = dict(detail or {})
        if hint:
            self.detail.setdefault("hint", hint)

    @property
    def hint(self) -> str | None:
        hint = self.detail.get("hint")
        return hint if isinstance(hint, str) else None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errors": [self.to_dict()]}
        if self.request_id:
            body["request_id"] = self.request_id
        return body


def _error(name: str, code: str, status: int, doc: str) -> type[LoregError]:
    cls = type(name, (LoregError,), {"code": code, "status": status, "__doc__": doc})
    return cls


# 400: malformed bytes or request
RequestInvalidError = _error("RequestInvalidError", "REQUEST_INVALID", 400, "The request is malformed.")
NameInvalidError = _error("NameInvalidError", "NAME_INVALID", 400, "A name breaks the naming rules.")
VersionInvalidError = _error("VersionInvalidError", "VERSION_INVALID", 400, "A version or alias is malformed.")
ReferenceInvalidError = _error("ReferenceInvalidError", "REFERENCE_INVALID", 400, "A reference is malformed.")
DigestInvalidError = _error("DigestInvalidError", "DIGEST_INVALID", 400, "A digest is not sha256:<64 hex>.")
DigestMismatchError = _error("DigestMismatchError", "DIGEST_MISMATCH", 400, "Bytes do not hash to the digest.")
SizeMismatchError = _error("SizeMismatchError", "SIZE_MISMATCH", 400, "Bytes are not the declared size.")
HeaderTooLargeError = _error("HeaderTooLargeError", "HEADER_TOO_LARGE", 400, "safetensors header over the cap.")
HeaderInvalidError = _error("HeaderInvalidError", "HEADER_INVALID", 400, "safetensors header is malformed.")
TrailingDataError = _error("TrailingDataError", "TRAILING_DATA", 400, "Bytes after the last tensor.")
OffsetInvalidError = _error("OffsetInvalidError", "OFFSET_INVALID", 400, "Tensor offsets overlap or leave gaps.")
ShapeInvalidError = _error("ShapeInvalidError", "SHAPE_INVALID", 400, "A tensor shape is malformed.")
DuplicateKeyError = _error("DuplicateKeyError", "DUPLICATE_KEY", 400, "A JSON object repeats a key.")
DtypeUnknownError = _error("DtypeUnknownError", "DTYPE_UNKNOWN", 400, "A tensor has an unknown dtype.")
ManifestInvalidError = _error("ManifestInvalidError", "MANIFEST_INVALID", 400, "A version manifest is malformed.")
SourceInvalidError = _error("SourceInvalidError", "SOURCE_INVALID", 400, "A URL or path field was refused.")
FolderInvalidError = _error(
    "FolderInvalidError", "FOLDER_INVALID", 400, "A local folder is not an adapter or checkpoint folder (client side)."
)
# 401 / 403
UnauthorizedError = _error("UnauthorizedError", "UNAUTHORIZED", 401, "No valid token.")
DeniedError = _error("DeniedError", "DENIED", 403, "The token may not do this.")
# 404
NotFoundError = _error("NotFoundError", "NOT_FOUND", 404, "No such resource.")
AdapterNotFoundError = _error("AdapterNotFoundError", "ADAPTER_NOT_FOUND", 404, "No such adapter.")
VersionNotFoundError = _error("VersionNotFoundError", "VERSION_NOT_FOUND", 404, "No such version.")
AliasNotFoundError = _error("AliasNotFoundError", "ALIAS_NOT_FOUND", 404, "No such alias.")
BlobNotFoundError = _error("BlobNotFoundError", "BLOB_NOT_FOUND", 404, "No such blob.")
BaseNotFoundError = _error("BaseNotFoundError", "BASE_NOT_FOUND", 404, "No such base model.")
ExportNotFoundError = _error("ExportNotFoundError", "EXPORT_NOT_FOUND", 404, "No such export.")
CombinationNotFoundError = _error("CombinationNotFoundError", "COMBINATION_NOT_FOUND", 404, "No such combination.")
TokenNotFoundError = _error("TokenNotFoundError", "TOKEN_NOT_FOUND", 404, "No such token.")
FileNotStoredError = _error("FileNotStoredError", "FILE_NOT_FOUND", 404, "A version or export has no such file.")
MethodNotAllowedError = _error("MethodNotAllowedError", "METHOD_NOT_ALLOWED", 405, "The route has no such method.")
RequestTimeoutError = _error("RequestTimeoutError", "REQUEST_TIMEOUT", 408, "The request body stopped arriving.")
# 409
ConflictError = _error("ConflictError", "CONFLICT", 409, "The request conflicts with stored state.")
DigestAmbiguousError = _error("DigestAmbiguousError", "DIGEST_AMBIGUOUS", 409, "A short digest names several.")
# 413 / 415
TooLargeError = _error("TooLargeError", "TOO_LARGE", 413, "Over a size limit.")
ConfigTooLargeError = _error("ConfigTooLargeError", "CONFIG_TOO_LARGE", 413, "adapter_config.json too large.")
UnsupportedFormatError = _error("UnsupportedFormatError", "UNSUPPORTED_FORMAT", 415, "Pickle or zip bytes.")
# 422: well-formed but invalid
ConfigInvalidError = _error("ConfigInvalidError", "CONFIG_INVALID", 422, "A config is invalid.")
DtypeUnsupportedError = _error("DtypeUnsupportedError", "DTYPE_UNSUPPORTED", 422, "A dtype not allowed here.")
EmptyTensorError = _error("EmptyTensorError", "EMPTY_TENSOR", 422, "A tensor has no elements.")
NonFiniteValuesError = _error("NonFiniteValuesError", "NONFINITE_VALUES", 422, "A tensor holds NaN or inf.")
ShapeMismatchError = _error("ShapeMismatchError", "SHAPE_MISMATCH", 422, "Adapter shapes do not fit the base.")
RankMismatchError = _error("RankMismatchError", "RANK_MISMATCH", 422, "Ranks disagree.")
UnknownModuleError = _error("UnknownModuleError", "UNKNOWN_MODULE", 422, "A module is absent from the base.")
AdapterInvalidError = _error("AdapterInvalidError", "ADAPTER_INVALID", 422, "The adapter is invalid.")
BaseUnknownError = _error("BaseUnknownError", "BASE_UNKNOWN", 422, "The adapter's base is not registered.")
BaseMismatchError = _error("BaseMismatchError", "BASE_MISMATCH", 422, "Two versions are not on the same base model.")
BlobMissingError = _error("BlobMissingError", "BLOB_MISSING", 422, "A manifest names a blob not stored.")
MergeUnsupportedError = _error("MergeUnsupportedError", "MERGE_UNSUPPORTED", 422, "This merge cannot be done.")
CombinationInvalidError = _error(
    "CombinationInvalidError", "COMBINATION_INVALID", 422, "A combination method or parameter is invalid."
)
# 429 / 5xx
TooManyRequestsError = _error("TooManyRequestsError", "TOOMANYREQUESTS", 429, "Rate limited.")
InternalError = _error("InternalError", "INTERNAL", 500, "An unexpected error.")
MergeUnavailableError = _error("MergeUnavailableError", "MERGE_UNAVAILABLE", 501, "This server cannot merge.")
SettingsInvalidError = _error(
    "SettingsInvalidError", "SETTINGS_INVALID", 500, "The server's settings (LOREG_*) do not allow this."
)
DbUnavailableError = _error("DbUnavailableError", "DB_UNAVAILABLE", 503, "The database is unreachable.")
StorageUnavailableError = _error("StorageUnavailableError", "STORAGE_UNAVAILABLE", 503, "Storage is unreachable.")
UploadsBusyError = _error("UploadsBusyError", "UPLOADS_BUSY", 503, "Every upload slot is in use.")
StorageTimeoutError = _error("StorageTimeoutError", "STORAGE_TIMEOUT", 504, "Storage did not answer in time.")
InsufficientStorageError = _error("InsufficientStorageError", "INSUFFICIENT_STORAGE", 507, "Storage is full.")
# client side only (never sent by the server)
ConnectionFailedError = _error("ConnectionFailedError", "CONNECTION_FAILED", 503, "The server is unreachable.")
ExportTimeoutError = _error("ExportTimeoutError", "EXPORT_TIMEOUT", 504, "An export did not finish within the wait.")


ERRORS: dict[str, type[LoregError]] = {
    cls.code: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, LoregError) and cls is not LoregError
}
ERRORS["INTERNAL"] = InternalError


def error_from_envelope(status: int, body: Any, request_id: str | None = None) -> LoregError:
    """Rebuild the typed error from a server's error envelope (client side), with its request id."""
    err = _from_envelope(status, body)
    carried = body.get("request_id") if isinstance(body, dict) else None
    err.request_id = carried if isinstance(carried, str) else request_id
    return err


def _from_envelope(status: int, body: Any) -> LoregError:
    try:
        first = body["errors"][0]
        code, message = str(first["code"]), str(first["message"])
        detail = first.get("detail") or {}
    except (KeyError, IndexError, TypeError):
        err = InternalError(f"HTTP {status} with no error envelope")
        return err
    cls = ERRORS.get(code)
    if cls is None:
        cls = type("UnknownServerError", (LoregError,), {"code": code, "status": status})
    return cls(message, detail=detail if isinstance(detail, dict) else {"detail": detail})
