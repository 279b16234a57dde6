// Courier HTTP channel body (SMS): Kratos passes the message as top-level argument "ctx".
function(ctx) {
  To: ctx.recipient,
  Body: if 'template_data' in ctx && 'code' in ctx.template_data
  then 'Your code is: ' + ctx.template_data.code
  else 'A message from your account',
}
