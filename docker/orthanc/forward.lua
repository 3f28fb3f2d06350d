-- Forward every stable image series to the TinyLLaVA-Med server over STOW-RS (the DICOMweb
-- peer `tinyllava-med` in orthanc.json). Series of objects that are not images are not
-- forwarded: the server's own reports (SR) and rejection notes (KO) coming back, presentation
-- states, documents, RT objects and segmentations; the server stores images only and would
-- refuse them (0x0122).
local NOT_IMAGES = {
  SR = true, KO = true, PR = true, DOC = true, SEG = true, REG = true,
  RTSTRUCT = true, RTPLAN = true, RTDOSE = true, RTRECORD = true,
}

function OnStableSeries(seriesId, tags, metadata)
  if not NOT_IMAGES[tags['Modality']] then
    local body = '{"Resources": ["' .. seriesId .. '"], "Synchronous": false}'
    RestApiPost('/dicom-web/servers/tinyllava-med/stow', body)
  end
end
