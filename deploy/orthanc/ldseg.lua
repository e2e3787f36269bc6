-- Orthanc -> ldseg-serve: when a series is stable (no new instance for StableAge seconds), ask
-- ldseg-serve to segment it through its DICOMweb endpoint. ldseg-serve fetches the series from
-- this Orthanc (WADO-RS), segments it and stores the DICOM SEG back (STOW-RS); the SEG's own
-- series is skipped here, so nothing loops.
--
-- The request says `Prefer: respond-async`: ldseg-serve answers 202 at once and works on. It
-- must: Orthanc holds its Lua lock while HttpPost waits, and its DICOMweb server waits on that
-- lock, so a synchronous call would wait for a WADO-RS answer that cannot come. (The headers
-- table must not be empty either: Orthanc 1.10 aborts on an empty one.)
--
-- Environment (of the Orthanc process): LDSEG_SERVE_URL (default http://127.0.0.1:8000) and,
-- when ldseg-serve runs with --api-key-file, LDSEG_API_KEY.

local url = os.getenv('LDSEG_SERVE_URL') or 'http://127.0.0.1:8000'
local key = os.getenv('LDSEG_API_KEY')

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'SEG' or tags['Modality'] == 'RTSTRUCT' or tags['Modality'] == 'SR' then
    return
  end
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local study = ParseJson(RestApiGet('/studies/' .. series['ParentStudy']))
  local studyUid = study['MainDicomTags']['StudyInstanceUID']
  local seriesUid = series['MainDicomTags']['SeriesInstanceUID']
  local headers = {}
  headers['Prefer'] = 'respond-async'
  if key ~= nil and key ~= '' then
    headers['Authorization'] = 'Bearer ' .. key
  end
  local target = url .. '/v1/dicomweb/studies/' .. studyUid .. '/series/' .. seriesUid
  local ok, answer = pcall(HttpPost, target, '', headers)
  if ok and answer ~= nil then
    print('ldseg: series ' .. seriesUid .. ' handed to ldseg-serve: ' .. tostring(answer))
  else
    -- refused (401, 503 busy) or ldseg-serve is down: nothing is stored; its log says why
    print('ldseg: series ' .. seriesUid .. ' not handed to ldseg-serve: ' .. tostring(answer))
  end
end
