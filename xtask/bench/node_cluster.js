// The Node.js baseline for `cargo xtask bench`: the same server as the `hello` example
// (body `handled by process.<pid>\n`, keep-alive as the client asks), run with Node's own
// `cluster` module.
//
//   node node_cluster.js --workers N --policy rr|none --host 127.0.0.1 --port 0 [--work N]
//
// Once every worker listens, the primary prints `ready http://HOST:PORT workers=N mode=M`
// on stdout, like `hello`. A worker that dies is forked again at once (the respawn
// scenario measures how long that takes).
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');

function arg(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const workers = Number(arg('workers', '2'));
const policy = arg('policy', 'rr');
const host = arg('host', '127.0.0.1');
const port = Number(arg('port', '0'));
const work = Number(arg('work', '0'));

// Must be set before the first fork.
cluster.schedulingPolicy = policy === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;

if (cluster.isPrimary) {
  let listening = 0;
  let announced = false;
  cluster.on('listening', (_worker, address) => {
    listening += 1;
    if (!announced && listening >= workers) {
      announced = true;
      const shown = address.address.includes(':') ? `[${address.address}]` : address.address;
      process.stdout.write(`ready http://${shown}:${address.port} workers=${workers} mode=${policy}\n`);
    }
  });
  cluster.on('exit', () => {
    cluster.fork();
  });
  for (let i = 0; i < workers; i += 1) {
    cluster.fork();
  }
  const stop = () => {
    for (const worker of Object.values(cluster.workers)) {
      worker.process.kill('SIGKILL');
    }
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const body = `handled by process.${process.pid}\n`;
  http
    .createServer((req, res) => {
      let acc = 0;
      for (let i = 0; i < work; i += 1) {
        acc = (acc * 31 + i) | 0;
      }
      if (acc === 0.5) {
        console.error('unreachable');
      }
      res.setHeader('Content-Type', 'text/plain');
      res.end(body);
    })
    .listen(port, host);
}
