// OIDC claim mapper (GitHub): Kratos passes the provider's claims as ext code "claims".
// Only a verified e-mail address becomes a trait, so unverified addresses cannot be used to
// take over an account.
local claims = { email_verified: false } + std.extVar('claims');

{
  identity: {
    traits: {
      [if 'email' in claims && claims.email_verified then 'email' else null]: claims.email,
      [if 'raw_claims' in claims && 'login' in claims.raw_claims then 'username' else null]:
        claims.raw_claims.login,
    },
  },
}
