// A real, certified OpenID Provider (panva/oidc-provider) on loopback for jitgate's login
// tests. Usage: node provider.mjs CONFIG.json
//
// CONFIG.json: {
//   "client_id": "...", "client_secret": "...",
//   "accounts": { "LOGIN": { "email": "...", "groups": ["..."] } },
//   "id_token_ttl": 600,           (optional, seconds)
//   "redirect_uris": ["https://..."] (optional: more, such as the web console's callback)
// }
// Listens on 127.0.0.1 and a free port, then prints `READY http://127.0.0.1:PORT` (the
// issuer) on stdout. Sign-in uses the provider's development interactions: any password,
// the login names the account. The client is a confidential native client, so loopback
// redirect URIs match on any port (RFC 8252), as `jitgate login --browser` needs.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: config.client_id,
    client_secret: config.client_secret,
    application_type: 'native',
    token_endpoint_auth_method: 'client_secret_post',
    grant_types: ['authorization_code', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback', ...(config.redirect_uris ?? [])],
  }],
  async findAccount(ctx, id) {
    const account = config.accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: `sub-${id}`, email: account.email, email_verified: true, groups: account.groups };
      },
    };
  },
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
  // Put the scope's claims in the ID token itself, as most enterprise providers do.
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
  },
  pkce: { required: () => true },
  ttl: { IdToken: config.id_token_ttl ?? 600 },
  cookies: { keys: ['jitgate-test-cookie-key'] },
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));

server.on('request', provider.callback());
console.log(`READY ${issuer}`);
