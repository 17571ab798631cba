// The smallest useful JavaScript plugin, and the starting point for a new one: greets the caller.
//
// Replace `handle` with your plugin's work. The platform's interfaces are ES modules:
// 'plinth:plugin/inference@0.1.0' (classify, embed, infer), '…/kv@0.1.0', '…/config@0.1.0' and
// '…/log@0.1.0'; see ../README.md. Return the JSON answer as a string; throw
// `{ tag: 'invalid-request', val: message }` for a bad request, `{ tag: 'failed', val: message }`
// when the plugin cannot do its job.
import { log } from 'plinth:plugin/log@0.1.0';

export const handler = {
  handle(request) {
    let body;
    try {
      body = JSON.parse(request);
    } catch (err) {
      throw { tag: 'invalid-request', val: `the request is not JSON: ${err.message}` };
    }
    if (typeof body?.name !== 'string') {
      throw { tag: 'invalid-request', val: '`name` (a string) is required' };
    }
    log('info', `greeting a name of ${body.name.length} characters`);
    return JSON.stringify({ greeting: `Hello, ${body.name}!` });
  },
};
