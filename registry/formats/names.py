"""Names, aliases, references and file paths: full-match rules, shared by CLI and server.

Every check uses ``re.fullmatch`` on a str (``re.match(r"^…$")`` would accept a trailing newline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loreg.registry.errors import (
    AdapterInvalidError,
    NameInvalidError,
    ReferenceInvalidError,
    UnsupportedFormatError,
    VersionInvalidError,
)

NAME_PART = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
MAX_NAME_LENGTH = 128
ALIAS = re.compile(r"[a-z][a-z0-9._-]{0,63}")
RESERVED_ALIASES = frozenset({"latest"})
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# a version or base model named by digest may be shortened to a unique prefix (loreg prints 12 digits)
MIN_DIGEST_PREFIX = 12
DIGEST_PREFIX = re.compile(r"sha256:[0-9a-f]{%d,64}" % MIN_DIGEST_PREFIX)
DIGEST_PREFIX_HINT = f"digests look like sha256:<hex>, at least {MIN_DIGEST_PREFIX} lowercase hex digits of the 64"
BASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
BASE_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_VERSION_NUMBER = 2**31 - 1

# Tokenizer and chat-template files: they travel with adapters and with base checkpoints.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
# Files a PEFT adapter folder may hold that loreg stores: the client pushes only these and the server
# commits only these (anything else, e.g. modeling_*.py or a pickle under an innocent name, is refused).
ADAPTER_FILES = TOKENIZER_FILES | {
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    "generation_config.json",
}
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
CARD_FILE = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_name_part(part: str, what: str = "name") -> str:
    if not isinstance(part, str) or NAME_PART.fullmatch(part) is None:
        raise NameInvalidError(
            f"invalid {what} {part!r}",
            detail={what: str(part)[:200]},
            hint="use lowercase letters, digits and single '.', '_' or '-' between them",
        )
    return part


def check_name(namespace: str, name: str) -> tuple[str, str]:
    check_name_part(namespace, "namespace")
    check_name_part(name, "name")
    if len(namespace) + 1 + len(name) > MAX_NAME_LENGTH:
        raise NameInvalidError(
            f"name {namespace}/{name} is longer than {MAX_NAME_LENGTH} characters",
            detail={"name": f"{namespace}/{name}"[:200]},
        )
    return namespace, name


def split_name(full: str) -> tuple[str, str]:
    if not isinstance(full, str) or full.count("/") != 1:
        raise NameInvalidError(
            f"invalid adapter name {str(full)[:200]!r}", hint="adapter names look like NAMESPACE/NAME, e.g. org/support-bot"
        )
    namespace, name = full.split("/")
    return check_name(namespace, name)


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or ALIAS.fullmatch(alias) is None:
        raise VersionInvalidError(
            f"invalid alias {str(alias)[:100]!r}",
            detail={"alias": str(alias)[:100]},
            hint="aliases start with a lowercase letter: [a-z][a-z0-9._-]{0,63}",
        )
    if alias in RESERVED_ALIASES:
        raise VersionInvalidError(f"alias {alias!r} is reserved", detail={"alias": alias})
    return alias


@dataclass(frozen=True)
class Reference:
    """``ns/name`` (latest), ``ns/name:3``, ``ns/name:ALIAS`` or ``ns/name@sha256:…`` (12+ hex digits)."""

    namespace: str
    name: str
    tag: str = "latest"  # "latest", a number, an alias or a digest

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def number(self) -> int | None:
        return int(self.tag) if self.tag.isdigit() else None

    @property
    def digest(self) -> str | None:
        return self.tag if self.tag.startswith("sha256:") else None

    def __str__(self) -> str:
        if self.tag == "latest":
            return self.full_name
        sep = "@" if self.digest else ":"
        return f"{self.full_name}{sep}{self.tag}"


def check_tag(tag: str) -> str:
    """A version selector: ``latest``, a number, an alias or ``sha256:<hex>`` (a prefix of 12+ digits)."""
    if not isinstance(tag, str):
        raise VersionInvalidError("invalid version")
    if tag == "latest" or DIGEST_PREFIX.fullmatch(tag):
        return tag
    if tag.startswith("sha256:"):
        raise VersionInvalidError(
            f"invalid digest {tag[:100]!r}", detail={"version": tag[:100]}, hint=DIGEST_PREFIX_HINT
        )
    if re.fullmatch(r"[1-9][0-9]{0,9}", tag):
        if int(tag) > MAX_VERSION_NUMBER:
            raise VersionInvalidError(f"version number {tag} is out of range", detail={"version": tag})
        return tag
    if ALIAS.fullmatch(tag):
        return tag
    raise VersionInvalidError(
        f"invalid version {tag[:100]!r}",
        detail={"version": tag[:100]},
        hint="a version is a number (3), an alias (prod), 'latest' or a digest (sha256:…)",
    )


def parse_reference(ref: str) -> Reference:
    if not isinstance(ref, str) or len(ref) > 512:
        raise ReferenceInvalidError("invalid reference")
    if "@" in ref:
        name, _, tag = ref.partition("@")
        if DIGEST_PREFIX.fullmatch(tag) is None:
            raise ReferenceInvalidError(f"invalid digest in {ref[:200]!r}", hint=DIGEST_PREFIX_HINT)
    elif ":" in ref:
        name, _, tag = ref.partition(":")
    else:
        name, tag = ref, "latest"
    namespace, short = split_name(name)
    return Reference(namespace, short, check_tag(tag))


def check_file_name(path: str) -> str:
    """A stored file name: one plain path component, never a path; no pickle formats."""
    if not isinstance(path, str) or FILE_NAME.fullmatch(path) is None or path in (".", ".."):
        raise NameInvalidError(f"invalid file name {str(path)[:200]!r}", detail={"path": str(path)[:200]})
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise UnsupportedFormatError(
            f"{path} is a pickle file; loreg never stores pickle",
            detail={"path": path},
            hint="convert the weights to safetensors (PEFT: model.save_pretrained(dir, safe_serialization=True))",
        )
    return path


def check_adapter_file(path: str, size: int, *, max_card_size: int) -> str:
    """A file of an adapter version: a plain name on the adapter allowlist; the card within its limit."""
    check_file_name(path)
    if path not in ADAPTER_FILES:
        raise AdapterInvalidError(
            f"{path} is not a file loreg stores with an adapter",
            detail={"path": path, "rule": "allowlist", "allowed": sorted(ADAPTER_FILES)},
            hint="an adapter version holds adapter_config.json, adapter_model.safetensors, README.md and "
            "tokenizer/chat-template files; `loreg push` leaves the rest out",
        )
    if path == CARD_FILE and size > max_card_size:
        raise AdapterInvalidError(
            f"{path} is {size} bytes, over the card limit of {max_card_size}",
            detail={"path": path, "rule": "card_size", "size": size, "limit": max_card_size},
            hint="shorten the model card",
        )
    return path


def check_base_name(name: str) -> str:
    if not isinstance(name, str) or BASE_NAME.fullmatch(name) is None or ".." in name:
        raise NameInvalidError(
            f"invalid base model name {str(name)[:200]!r}",
            detail={"name": str(name)[:200]},
            hint="base model names look like Org/Model-1.5B",
        )
    return name


def check_base_revision(revision: str) -> str:
    if not isinstance(revision, str) or BASE_REVISION.fullmatch(revision) is None or ".." in revision:
        raise VersionInvalidError(f"invalid revision {str(revision)[:100]!r}", detail={"revision": str(revision)[:100]})
    return revision
