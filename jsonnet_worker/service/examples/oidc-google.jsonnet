// OIDC claim mapper (Google): claims as ext code "claims"; a subject is required.
local claims = std.extVar('claims');

if !('sub' in claims) || claims.sub == '' then error 'claim sub not set' else {
  identity: {
    traits: {
      [if 'email' in claims && std.get(claims, 'email_verified', false) then 'email' else null]:
        claims.email,
      [if 'given_name' in claims then 'name' else null]: {
        first: claims.given_name,
        [if 'family_name' in claims then 'last' else null]: claims.family_name,
      },
    },
    metadata_public: { provider_subject: claims.sub },
  },
}
