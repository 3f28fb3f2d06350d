-- Forward every stable image series to the TinyLLaVA-Med server over STOW-RS (the DICOMweb
-- peer `tinyllava-med` in orthanc.json). SR and KO series are not forwarded: they are the
-- server's own reports and rejection notes coming back, and the server only takes images.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] ~= 'SR' and tags['Modality'] ~= 'KO' then
    local body = '{"Resources": ["' .. seriesId .. '"], "Synchronous": false}'
    RestApiPost('/dicom-web/servers/tinyllava-med/stow', body)
  end
end
