-- Orthanc -> Pleura auto-routing (compose.yaml loads it through ORTHANC__LUA_SCRIPTS).
-- Every chest radiograph (CR or DX whose Body Part Examined is empty or names the chest) is sent,
-- instance by instance as it arrives, to the DicomModalities entry 'pleura'. Pleura decides when
-- the study is complete (its quiet period) and applies its own eligibility gate.
-- What Pleura sends back (SR, SC; calling AE PLEURA) is never forwarded to it again.
-- A send that fails (Pleura down) is a failed Orthanc job: resubmit it from Orthanc's /jobs.

local PLEURA_MODALITY = 'pleura'
local PLEURA_AET = 'PLEURA'
local FORWARDED_MODALITIES = { CR = true, DX = true }
local CHEST_WORDS = { 'CHEST', 'THORAX', 'LUNG' }

local function isChest(bodyPart)
  if bodyPart == nil or bodyPart == '' then
    return true  -- many CR/DX leave it empty; Pleura's gate looks at the image's other attributes
  end
  local upper = string.upper(bodyPart)
  for _, word in ipairs(CHEST_WORDS) do
    if string.find(upper, word, 1, true) ~= nil then
      return true
    end
  end
  return false
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RemoteAet'] == PLEURA_AET then
    return
  end
  if FORWARDED_MODALITIES[tags['Modality']] and isChest(tags['BodyPartExamined']) then
    SendToModality(instanceId, PLEURA_MODALITY)
  end
end
