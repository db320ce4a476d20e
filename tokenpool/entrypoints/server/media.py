"""Chat-style inputs (`messages`) and the media allow-list: nothing is fetched or read unless allowed.

- `data:image/...;base64,...` URLs are inline: always allowed.
- `http(s)://` URLs: only when the host is one of `--allowed-media-domains` (exact host names, matched
  case-insensitively; a leading `*.` allows every subdomain of that name).
- `file://` URLs: only for files inside `--allowed-local-media-path` (after resolving `..` and symlinks).
- Every other scheme is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tokenpool.entrypoints.server.errors import APIError
from tokenpool.entrypoints.server.protocol import ChatMessage, ImagePart


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from (see the module docstring)."""

    allowed_local_media_path: Path | None = None
    allowed_media_domains: tuple[str, ...] = ()

    @classmethod
    def create(cls, local_path: str | None, domains: list[str] | None) -> "MediaPolicy":
        root = None
        if local_path:
            root = Path(local_path).expanduser().resolve()
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path {local_path!r} is not a directory.")
        return cls(root, tuple(d.strip().lower().rstrip(".") for d in domains or () if d.strip()))

    def check_url(self, url: str) -> None:
        """Raise a 400 `APIError` unless the policy allows reading `url`."""
        shown = url if len(url) <= 100 else url[:97] + "..."
        if url.startswith("data:"):
            header, sep, _ = url.partition(",")
            if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
                raise APIError(f"Invalid image data URL {shown!r}: expected data:image/<type>;base64,<data>.",
                               param="messages")
            return
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            host = (parts.hostname or "").lower().rstrip(".")
            if not host:
                raise APIError(f"Image URL {shown!r} has no host.", param="messages")
            if not self._domain_allowed(host):
                allowed = ", ".join(self.allowed_media_domains) or "none: remote media is disabled"
                raise APIError(
                    f"Image URL {shown!r} is not allowed: host {host!r} is not in --allowed-media-domains "
                    f"({allowed}).", param="messages")
            return
        if scheme == "file":
            if self.allowed_local_media_path is None:
                raise APIError(
                    f"Image URL {shown!r} is not allowed: reading local files is disabled "
                    "(start the server with --allowed-local-media-path).", param="messages")
            path = Path(unquote(parts.path)).resolve()
            if not path.is_relative_to(self.allowed_local_media_path):
                raise APIError(
                    f"Image URL {shown!r} is not allowed: it is outside --allowed-local-media-path "
                    f"({self.allowed_local_media_path}).", param="messages")
            return
        raise APIError(f"Image URL {shown!r} has an unsupported scheme; use http(s)://, data: or file://.",
                       param="messages")

    def _domain_allowed(self, host: str) -> bool:
        for domain in self.allowed_media_domains:
            if domain.startswith("*."):
                if host.endswith(domain[1:]):
                    return True
            elif host == domain:
                return True
        return False


@dataclass(frozen=True)
class ChatPrompt:
    """A `messages` input flattened: the text for the tokenizer and the image URLs it refers to."""

    text: str
    image_urls: tuple[str, ...]


def parse_messages(messages: list[ChatMessage], policy: MediaPolicy, supports_images: bool,
                   tokenizer=None, image_placeholder: str = "") -> ChatPrompt:
    """Check every image URL against the policy, refuse images on a text-only model, build the prompt text.

    With a chat template in the tokenizer the conversation is rendered through it (image parts become
    `{"type": "image"}` entries, which Qwen2-VL's template turns into its image placeholder); otherwise the
    parts are joined with newlines, each image part written as `image_placeholder`.
    """
    urls: list[str] = []
    texts: list[str] = []
    for message in messages:
        if isinstance(message.content, str):
            texts.append(message.content)
            continue
        for part in message.content:
            if isinstance(part, ImagePart):
                policy.check_url(part.image_url.url)
                urls.append(part.image_url.url)
                texts.append(image_placeholder)
            else:
                texts.append(part.text)
    if urls and not supports_images:
        raise APIError(f"This model accepts text only; the request has {len(urls)} image input(s) "
                       "(image_url parts).", param="messages")
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        rendered = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content if isinstance(m.content, str) else
              [{"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in m.content]}
             for m in messages],
            tokenize=False)
        if not urls or rendered.count(image_placeholder) == len(urls):
            return ChatPrompt(rendered, tuple(urls))
    text = "\n".join(texts)
    if not text.strip():
        raise APIError("`messages` has no text.", param="messages")
    return ChatPrompt(text, tuple(urls))


def load_images(urls: tuple[str, ...]) -> list:
    """The images behind already-checked URLs; unreadable or undecodable images are 400s."""
    from tokenpool.multimodal.utils import fetch_image

    images = []
    for url in urls:
        try:
            images.append(fetch_image(url))
        except (ValueError, OSError) as e:
            raise APIError(str(e), param="messages") from e
    return images
