"""The ceiling: a bare aiosmtpd server whose handler answers 250 and stores nothing."""

from __future__ import annotations

import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP


class Sink:
    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        return "250 2.0.0 OK"


async def main(port: int, max_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Sink()

    def factory() -> SMTP:
        # Same constructor arguments as deskgate's listener, so only the pipeline differs.
        return SMTP(handler, hostname="sink.test", ident="sink ESMTP", data_size_limit=max_bytes,
                    enable_SMTPUTF8=True, decode_data=False, loop=loop)

    server = await loop.create_server(factory, host="127.0.0.1", port=port, reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 64 * 2**20))
