// Node.js `fetch` from undici as docs/operations.md shows it. argv: URL, then the dispatcher:
//   env    new EnvHttpProxyAgent()   reads HTTP_PROXY / HTTPS_PROXY / NO_PROXY
//   proxy  new ProxyAgent(PROXY)     every request through the proxy
//   none   no dispatcher             (base-URL mode)
// The trusted CA comes from NODE_EXTRA_CA_CERTS. Prints the status, then the body.
const { fetch, setGlobalDispatcher, EnvHttpProxyAgent, ProxyAgent } = require("undici");

(async () => {
  const [url, dispatcher] = process.argv.slice(2);
  if (dispatcher === "env") setGlobalDispatcher(new EnvHttpProxyAgent());
  if (dispatcher === "proxy") setGlobalDispatcher(new ProxyAgent(process.env.PROXY));
  const response = await fetch(url);
  console.log(response.status);
  console.log(await response.text());
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
