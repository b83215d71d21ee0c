"""The notebook kernel of `qin report`: this interpreter's ipykernel, and Ctrl-C that stops it quietly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbclient import NotebookClient


def this_python_kernel_manager() -> type:
    """A kernel manager class that starts ipykernel with *this* interpreter, whatever kernelspecs are
    installed (a user-level `python3` spec may point at another Python, without qin)."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    class ThisPythonKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="Python 3 (qin)", language="python")

    return ThisPythonKernelManager


def notebook_client_class() -> type:
    """nbclient's NotebookClient without its own SIGINT/SIGTERM handlers.

    Those shut the kernel down under the running cell, which then fails with DeadKernelError and the
    context exit with an AssertionError (a 68-line traceback on Ctrl-C); `execute` owns Ctrl-C instead.
    The kernel is always shut down on the way out, also when the start is interrupted, and shutting it
    down twice is harmless.
    """
    from nbclient import NotebookClient

    class QuietClient(NotebookClient):
        @asynccontextmanager
        async def async_setup_kernel(self, **kwargs: Any) -> AsyncGenerator[None, None]:
            kwargs.pop("cleanup_kc", None)  # this client always owns its kernel
            if self.km is None:
                self.km = self.create_kernel_manager()
            try:
                if not self.km.has_kernel:
                    await self.async_start_new_kernel(**kwargs)
                if self.kc is None:
                    await self.async_start_new_kernel_client()
                yield
            finally:
                await self._async_cleanup_kernel()

        async def _async_cleanup_kernel(self) -> None:
            if self.km is not None:
                await super()._async_cleanup_kernel()

    return QuietClient


def execute(client: NotebookClient, **kwargs: Any) -> None:
    """`client.execute(**kwargs)` on a fresh event loop, where Ctrl-C kills the kernel and raises
    KeyboardInterrupt (no DeadKernelError, no traceback of the cleanup)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(client.async_execute(**kwargs))
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        if not interrupted:  # a second Ctrl-C while the kernel is being killed changes nothing
            interrupted = True
            client.shutdown_kernel = "immediate"  # kill it: a busy kernel would not answer a shutdown request
            task.cancel()

    # Only where Ctrl-C would raise KeyboardInterrupt: not where SIGINT is ignored (nohup, a background job)
    # or handled by the caller; not on Windows or off the main thread (no signal handlers there).
    handling = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if handling:
        try:
            loop.add_signal_handler(signal.SIGINT, interrupt)
        except (NotImplementedError, RuntimeError, ValueError):
            handling = False
    try:
        try:
            loop.run_until_complete(task)
        except BaseException:
            if not task.done():  # a KeyboardInterrupt raised out of the loop: stop the kernel before leaving
                interrupt()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
            raise
        finally:
            _cancel_pending(loop)
            if handling:
                loop.remove_signal_handler(signal.SIGINT)  # restores default_int_handler
            loop.close()
    except BaseException:
        if interrupted:
            raise KeyboardInterrupt from None  # the DeadKernelError of the killed kernel is no news
        raise
    if interrupted:
        raise KeyboardInterrupt


def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await what nbclient left running (its kernel-alive poll outlives a killed cell)."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
