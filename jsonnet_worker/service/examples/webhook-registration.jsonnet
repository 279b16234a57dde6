// Web-hook body after registration: Kratos passes the flow and identity as TLA "ctx".
function(ctx) {
  flow_id: ctx.flow.id,
  flow_type: ctx.flow.type,
  identity_id: if 'identity' in ctx then ctx.identity.id else null,
  email: if 'identity' in ctx then std.get(ctx.identity.traits, 'email', null) else null,
}
