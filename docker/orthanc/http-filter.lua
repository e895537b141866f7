-- Orthanc's HTTP access rule (compose.yaml loads it through ORTHANC__LUA_SCRIPTS).
-- The 'viewer' account is the one OHIF's proxy presents (docker/ohif/dicomweb-proxy.conf): it may
-- only read. Every other registered user (the 'admin' account) keeps full access.
-- Without a valid login Orthanc refuses the request before this filter runs.

function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if username == 'viewer' then
    return method == 'GET'
  end
  return true
end
