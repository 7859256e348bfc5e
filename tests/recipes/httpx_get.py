"""Python `httpx` as docs/operations.md shows it: the proxy and the trusted CA come from the
environment (HTTP_PROXY / HTTPS_PROXY / NO_PROXY, SSL_CERT_FILE: httpx ignores
REQUESTS_CA_BUNDLE). Prints the status, then the body."""
import sys

import httpx

response = httpx.get(sys.argv[1], timeout=10)
print(response.status_code)
print(response.text)
