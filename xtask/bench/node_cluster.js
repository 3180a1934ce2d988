// The Node.js baseline for `cargo xtask bench`: the same server as the `hello` example
// (body `handled by process.<pid>\n` padded with spaces to one length, keep-alive as the
// client asks), run with Node's own `cluster` module.
//
//   node node_cluster.js --workers N --policy rr|none --host 127.0.0.1 --port 0 [--work N]
//
// Once every worker listens, the primary prints `ready http://HOST:PORT workers=N mode=M`
// on stdout, like `hello`. A worker that dies is forked again at once (the respawn
// scenario measures how long that takes).
//
// The primary answers the same signals as `hello`'s, the way Node users commonly write it
// by hand (the rollout and scale scenarios measure them):
//
// - SIGHUP rolls every worker, one at a time: fork a replacement, wait for its 'listening',
//   `disconnect()` the old worker, wait for its 'exit', next. (Node's disconnect closes the
//   worker's listening handles and waits for its open connections to end, keep-alive ones
//   included.)
// - SIGTTIN forks one more worker.
// - SIGTTOU disconnects one worker (the newest) and waits for its 'exit'.
//
// These operations run one after another, in the order the signals came. Each step is logged
// on stderr.
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

function log(message) {
  process.stderr.write(`${new Date().toISOString()} primary: ${message}\n`);
}

// The workers that serve and are not being retired.
function serving() {
  return Object.values(cluster.workers).filter(
    (worker) => worker.isConnected() && !worker.exitedAfterDisconnect,
  );
}

// Resolves true once `worker` listens, false if it exits first.
function listeningOf(worker) {
  return new Promise((resolve) => {
    worker.once('listening', () => resolve(true));
    worker.once('exit', () => resolve(false));
  });
}

// Disconnects `worker` and resolves once it has exited.
function retire(worker) {
  if (worker.isDead()) {
    return Promise.resolve();
  }
  const exited = new Promise((resolve) => worker.once('exit', resolve));
  worker.disconnect();
  return exited;
}

async function rollout() {
  const old = serving();
  log(`rolling restart of ${old.length} workers`);
  for (const worker of old) {
    const fresh = cluster.fork();
    if (!(await listeningOf(fresh))) {
      log(`replacement ${fresh.id} exited before it listened; worker ${worker.id} stays`);
      continue;
    }
    await retire(worker);
    log(`worker ${worker.id} replaced by ${fresh.id}`);
  }
  log('rolling restart finished');
}

async function scaleUp() {
  const fresh = cluster.fork();
  await listeningOf(fresh);
  log(`scaled up: worker ${fresh.id}`);
}

async function scaleDown() {
  const worker = serving().pop();
  if (!worker) {
    log('scale down: no worker left to remove');
    return;
  }
  await retire(worker);
  log(`scaled down: worker ${worker.id} exited`);
}

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
  cluster.on('exit', (worker) => {
    // A worker retired on purpose is not replaced here.
    if (!worker.exitedAfterDisconnect) {
      cluster.fork();
    }
  });
  for (let i = 0; i < workers; i += 1) {
    cluster.fork();
  }
  let operations = Promise.resolve();
  const enqueue = (operation) => {
    operations = operations.then(operation).catch((err) => log(`failed: ${err}`));
  };
  process.on('SIGHUP', () => enqueue(rollout));
  process.on('SIGTTIN', () => enqueue(scaleUp));
  process.on('SIGTTOU', () => enqueue(scaleDown));
  const stop = () => {
    for (const worker of Object.values(cluster.workers)) {
      worker.process.kill('SIGKILL');
    }
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  // Padded to one length whatever the pid, as `hello` pads it.
  const body = `handled by process.${process.pid}\n`.padEnd('handled by process.\n'.length + 7);
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
