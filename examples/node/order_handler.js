#!/usr/bin/env node
// The tutorial's order workflow as a plain HTTP handler in Node.js, with no packages:
// the same contract as examples/python/order_handler.py, to show that it is language
// neutral. Each side effect goes through Durin's egress in its explicit form
// (http://EGRESS/http/HOST:PORT/PATH) with the invocation id Durin gave the handler.
//
//   node order_handler.js --port 9080 --egress http://127.0.0.1:8081 \
//     --payment http://127.0.0.1:9101 --inventory http://127.0.0.1:9102 --email http://127.0.0.1:9103
'use strict';
const http = require('node:http');

const args = {};
for (let i = 2; i < process.argv.length; i += 2) {
  args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
}
for (const required of ['egress', 'payment', 'inventory', 'email']) {
  if (!args[required]) {
    console.error(`missing --${required}`);
    process.exit(2);
  }
}
const stepDelayMs = Number(args['step-delay-ms'] || 0);

// POST `url` through the egress: http://EGRESS/{scheme}/{host:port}/{path}.
async function call(url, body, invocationId, attempt, token) {
  const target = new URL(url);
  const viaEgress = `${args.egress}/${target.protocol.replace(':', '')}/${target.host}${target.pathname}`;
  const response = await fetch(viaEgress, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      'durin-invocation-id': invocationId,
      'durin-attempt': attempt,
      // The attempt's secret: the egress carries only calls of the running attempt.
      'durin-attempt-token': token,
    },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (response.status >= 300) {
    const error = new Error(`downstream answered ${response.status}: ${text.slice(0, 200)}`);
    error.status = response.status;
    throw error;
  }
  return JSON.parse(text);
}

async function processOrder(order, invocationId, attempt, token) {
  const step = async (url, body) => {
    await new Promise((resolve) => setTimeout(resolve, stepDelayMs));
    return call(url, body, invocationId, attempt, token);
  };
  const charge = await step(`${args.payment}/charge`, { order_id: order.order_id, amount_cents: order.amount_cents });
  const reservation = await step(`${args.inventory}/reserve`, { order_id: order.order_id });
  await step(`${args.email}/send`, { order_id: order.order_id, customer_id: order.customer_id });
  return `order ${order.order_id} complete charge ${charge.charge_id} reservation ${reservation.reservation_id}`;
}

function answer(res, status, body, contentType = 'application/json') {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', async () => {
    if (req.method !== 'POST' || req.url !== '/order/process') {
      return answer(res, 404, { title: 'no such handler' }, 'application/problem+json');
    }
    let order;
    try {
      order = JSON.parse(Buffer.concat(chunks).toString());
      if (!order.order_id || !order.customer_id || !Number.isInteger(order.amount_cents)) throw new Error('order_id, customer_id and amount_cents are required');
    } catch (error) {
      // 4xx: a terminal failure; Durin does not retry it.
      return answer(res, 422, { title: 'invalid order', status: 422, detail: String(error.message) }, 'application/problem+json');
    }
    try {
      const output = await processOrder(
        order, req.headers['durin-invocation-id'], req.headers['durin-attempt'], req.headers['durin-attempt-token']);
      answer(res, 200, output);
    } catch (error) {
      // A refusal (4xx) is final; anything else is worth another attempt (5xx).
      const status = error.status >= 400 && error.status < 500 ? 422 : 503;
      answer(res, status, { title: 'downstream failed', status, detail: String(error.message) }, 'application/problem+json');
    }
  });
});

server.listen(Number(args.port || 9080), '127.0.0.1', () => {
  console.log(`order handler listening on http://127.0.0.1:${server.address().port}`);
});
