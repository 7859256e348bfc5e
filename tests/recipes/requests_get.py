"""Python `requests` as docs/operations.md shows it: the proxy and the trusted CA come from
the environment (HTTP_PROXY / HTTPS_PROXY / NO_PROXY, REQUESTS_CA_BUNDLE); the code is
unchanged. Prints the status, then the body."""
import sys

import requests

response = requests.get(sys.argv[1], timeout=10)
print(response.status_code)
print(response.text)
