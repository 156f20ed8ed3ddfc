#!/usr/bin/env python3
"""Container health check: GET http://127.0.0.1:$HMT_PORT<path> and exit 0 on a 2xx answer, else 1.

Usage: hmt-healthcheck [/healthz | /readyz]. The image's HEALTHCHECK asks /healthz (the process
serves); compose asks /readyz (the model is loaded and Redis answers). Python's urllib instead of
curl, so the image needs no extra package.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(path: str = "/healthz", port: str | None = None, timeout: float = 3.0) -> tuple[bool, str]:
    """(healthy, why) for one request to the local server."""
    url = f"http://127.0.0.1:{port or os.environ.get('HMT_PORT', '8000')}{path}"
    # no proxy handler: an HTTP(S)_PROXY in the container's environment must not catch a loopback probe
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"
    return 200 <= status < 300, f"{url}: HTTP {status}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    healthy, why = check(path, timeout=float(os.environ.get("HMT_HEALTHCHECK_TIMEOUT", "3")))
    if not healthy:
        print(f"unhealthy: {why}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
