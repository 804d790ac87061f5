// Verify the DKIM signatures of a message read from stdin with mailauth, asking the DNS
// server at argv[2]:argv[3] for keys. Prints one JSON line per signature:
// {"status": "pass"|"fail"|..., "algo": "...", "domain": "...", "selector": "..."}.
'use strict';
const dns = require('node:dns');
const { dkimVerify } = require('mailauth/lib/dkim/verify');

async function main() {
    const [server, port] = process.argv.slice(2);
    const resolver = new dns.promises.Resolver({ timeout: 2000, tries: 2 });
    resolver.setServers([`${server}:${port}`]);
    const chunks = [];
    for await (const chunk of process.stdin) chunks.push(chunk);
    const result = await dkimVerify(Buffer.concat(chunks), {
        resolver: (name, rr) => resolver.resolve(name, rr),
    });
    for (const r of result.results) {
        console.log(JSON.stringify({
            status: r.status.result, comment: r.status.comment || '', algo: r.algo,
            domain: r.signingDomain, selector: r.selector,
        }));
    }
}

main().catch((err) => { console.error(err && err.message); process.exit(2); });
