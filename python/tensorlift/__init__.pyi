"""Type stubs for tensorlift (see __init__.py and docs/PYTHON.md)."""

from os import PathLike
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union, final

_Path = Union[str, PathLike]
_Framework = Optional[
    Literal["pt", "torch", "pytorch", "np", "numpy", "flax", "jax", "tf", "tensorflow", "paddle", "mlx"]
]
_Device = Union[str, Any]

__all__ = [
    "DeviceMemoryError",
    "SafetensorError",
    "Tensor",
    "TensorIterator",
    "__version__",
    "inspect",
    "is_remote",
    "iter_tensors",
    "load",
    "load_devices",
    "load_file",
    "load_group",
    "patch",
    "release_host_memory",
    "resolve_device",
    "retained_host_memory",
    "reuse_host_memory",
    "safe_open",
    "unpatch",
]

__version__: str

# Made by the Rust extension: neither can be subclassed.
@final
class Tensor:
    """A loaded tensor; numpy and torch take it through DLPack without a copy."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> List[int]: ...
    @property
    def device(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    def tobytes(self) -> bytes: ...
    def raw_bytes(self) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...

@final
class TensorIterator:
    def __iter__(self) -> "TensorIterator": ...
    def __next__(self) -> Tuple[str, Tensor]: ...
    def close(self) -> None: ...

def load(
    path: _Path,
    device: str = "cpu",
    filter: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    *,
    dtype: Optional[str] = None,
    tp: Optional[Tuple[int, int, int]] = None,
    stats: Optional[Dict[str, Any]] = None,
    verify: Optional[str] = None,
    cache_dir: Optional[_Path] = None,
) -> Dict[str, Tensor]: ...
def load_devices(
    path: _Path,
    devices: Sequence[_Device],
    framework: _Framework = "pt",
    *,
    dtype: Optional[Any] = None,
    tp: Optional[int] = None,
    stats: Optional[Dict[str, Any]] = None,
    cache_dir: Optional[_Path] = None,
) -> List[Dict[str, Any]]: ...
def load_group(
    path: _Path,
    group: Any = None,
    device: _Device = "cpu",
    *,
    tp: Optional[int] = None,
    stats: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]: ...
def load_file(
    filename: _Path,
    device: _Device = "cpu",
    framework: _Framework = "pt",
    *,
    dtype: Optional[Any] = None,
    tp: Optional[Tuple[int, int, int]] = None,
    stats: Optional[Dict[str, Any]] = None,
    verify: Union[bool, Literal["required", "if-known"], None] = None,
    cache_dir: Optional[_Path] = None,
    backend: Literal["mmap", "pread"] = "pread",
) -> Dict[str, Any]: ...
def iter_tensors(
    path: _Path,
    device: _Device = "cpu",
    framework: _Framework = "pt",
    filter: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    *,
    dtype: Optional[Any] = None,
    tp: Optional[Tuple[int, int, int]] = None,
    stats: Optional[Dict[str, Any]] = None,
    verify: Union[bool, Literal["required", "if-known"], None] = None,
    cache_dir: Optional[_Path] = None,
) -> Iterator[Tuple[str, Any]]: ...
def inspect(path: _Path) -> Dict[str, Any]: ...
def is_remote(path: _Path) -> bool: ...
def resolve_device(device: str = "auto") -> Tuple[str, str]: ...
def reuse_host_memory(enable: bool = True) -> None: ...
def release_host_memory() -> None: ...
def retained_host_memory() -> int: ...

class _Slice:
    def get_shape(self) -> List[int]: ...
    def get_dtype(self) -> str: ...
    def __getitem__(self, key: Any) -> Any: ...

class SafetensorError(Exception): ...
class DeviceMemoryError(RuntimeError): ...

def patch() -> Any: ...
def unpatch() -> None: ...

class safe_open:
    def __init__(
        self, filename: _Path, framework: _Framework = "pt", device: _Device = "cpu", *, backend: str = "pread"
    ) -> None: ...
    def get_tensors(self) -> Dict[str, Any]: ...
    def __enter__(self) -> "safe_open": ...
    def __exit__(self, *exc: Any) -> bool: ...
    def keys(self) -> List[str]: ...
    def offset_keys(self) -> List[str]: ...
    def metadata(self) -> Optional[Dict[str, str]]: ...
    def get_tensor(self, name: str) -> Any: ...
    def get_slice(self, name: str) -> _Slice: ...
