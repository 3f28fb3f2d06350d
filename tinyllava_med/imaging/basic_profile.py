"""DICOM PS3.15 Table E.1-1, Basic Profile column: attribute keyword -> de-identification action.

Transcribed from the standard's table (the attributes with a DICOM keyword; the repeating-group
rows, curves (50xx,xxxx) and overlay data/comments (60xx,3000)/(60xx,4000), and private
attributes are handled by rule in `deid.py`). Action codes as in PS3.15 E.1.1: X remove,
Z zero-length, D dummy value, U replace UID, and the combined codes (X/Z, X/D, Z/D, X/Z/D,
X/Z/U*) that `deid.py` resolves to one action.
"""

from __future__ import annotations


def _keywords(text: str) -> tuple[str, ...]:
    return tuple(text.split())


BASIC_PROFILE: dict[str, tuple[str, ...]] = {
    "X": _keywords(
        """
        AcquisitionComments AcquisitionProtocolDescription ActualHumanPerformersSequence
        AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate
        AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime
        AffectedSOPInstanceUID Allergies AnnotationGroupDescription ApprovalStatusDateTime
        Arbitrary AssertionExpirationDateTime AuthorObserverSequence BeamDescription
        BolusDescription BranchOfService CalibrationDate CalibrationTime CameraOwnerName
        CassetteID CertifiedTimestamp ClinicalTrialProtocolEthicsCommitteeApprovalNumber
        ClinicalTrialSeriesDescription ClinicalTrialSeriesID
        ClinicalTrialTimePointDescription CommentsOnRadiationDose
        CommentsOnThePerformedProcedureStep CompensatorDescription
        ConfidentialityConstraintOnPatientDataDescription
        ConsultingPhysicianIdentificationSequence ContainerComponentID ContainerDescription
        ContentCreatorIdentificationCodeSequence ContrastBolusStartTime
        ContrastBolusStopTime ContributionDateTime ContributionDescription
        CountryOfResidence CreationDate CreationTime CurrentObserverTrial
        CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence
        DataSetTrailingPadding DateOfDocumentOrVerbalTransactionTrial DateOfInstallation
        DateOfLastCalibration DateOfManufacture DateOfSecondaryCapture
        DateTimeOfLastCalibration DecompositionDescription DerivationDescription
        DeviceDescription DeviceSettingDescription DigitalSignaturesSequence DischargeDate
        DischargeDiagnosisDescription DischargeTime DisplacementReferenceLabel
        DistributionAddress DistributionName DoseReferenceDescription EntityDescription
        EntityName EquipmentFrameOfReferenceDescription
        EthicsCommitteeApprovalEffectivenessEndDate
        EthicsCommitteeApprovalEffectivenessStartDate EthnicGroup ExpectedCompletionDateTime
        FilterLookupTableDescription FindingsGroupRecordingDateTrial
        FindingsGroupRecordingTimeTrial FixationDeviceDescription FractionGroupDescription
        FrameComments GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDOP GPSDateStamp
        GPSDestBearing GPSDestBearingRef GPSDestDistance GPSDestDistanceRef GPSDestLatitude
        GPSDestLatitudeRef GPSDestLongitude GPSDestLongitudeRef GPSDifferential
        GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef GPSLongitude
        GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites
        GPSSpeed GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID
        GantryID GeneratorID HL7DocumentEffectiveTime HumanPerformerName
        HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments
        ImagePresentationComments ImagingServiceRequestComments Impressions
        InstanceCoercionDateTime InstanceOriginStatus InstitutionAddress
        InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
        InsurancePlanIdentification IntendedFractionStartTime
        IntendedRecipientsOfResultsIdentificationSequence InterpretationApprovalDate
        InterpretationApprovalTime InterpretationApproverSequence InterpretationAuthor
        InterpretationDiagnosisDescription InterpretationID InterpretationIDIssuer
        InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder
        InterpretationText InterpretationTranscriber InterpretationTranscriptionDate
        InterpretationTranscriptionTime InterventionDrugStartTime InterventionDrugStopTime
        IssueDateOfImagingServiceRequest IssueTimeOfImagingServiceRequest
        IssuerOfAdmissionID IssuerOfAdmissionIDSequence IssuerOfClinicalTrialProtocolID
        IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID
        IssuerOfClinicalTrialSubjectID IssuerOfClinicalTrialSubjectReadingID
        IssuerOfClinicalTrialTimePointID IssuerOfPatientID IssuerOfServiceEpisodeID
        IssuerOfServiceEpisodeIDSequence LastMenstrualDate LensMake LensModel
        LensSerialNumber LensSpecification LongDeviceDescription MAC MakerNote MedicalAlerts
        MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifiedImageDate
        ModifiedImageDescription ModifiedImageTime ModifyingDeviceID
        MultienergyAcquisitionDescription NameOfPhysiciansReadingStudy
        NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue
        NonconformingModifiedAttributesSequence ObservationDateTrial
        ObservationStartDateTime ObservationTimeTrial Occupation OrderCallbackPhoneNumber
        OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
        OriginalAttributesSequence Originator OtherClinicalTrialProtocolIDsSequence
        OtherPatientIDs OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime
        ParticipantSequence PatientAddress PatientAge PatientBirthName PatientBirthTime
        PatientComments PatientInstitutionResidence PatientInsurancePlanCodeSequence
        PatientMotherBirthName PatientPrimaryLanguageCodeSequence
        PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference
        PatientSetupPhotoDescription PatientSize PatientState PatientTelecomInformation
        PatientTelephoneNumbers PatientTransportArrangements
        PatientTreatmentPreparationMethodDescription
        PatientTreatmentPreparationProcedureParameterDescription PatientWeight
        PerformedLocation PerformedProcedureStepDescription PerformedProcedureStepEndDate
        PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime
        PerformedProcedureStepID PerformedProcedureStepStartDate
        PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime
        PerformedStationAETitle PerformedStationGeographicLocationCodeSequence
        PerformedStationName PerformedStationNameCodeSequence
        PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
        PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation
        PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
        PhysiciansReadingStudyIdentificationSequence PlateID
        PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication
        PregnancyStatus PrescriptionDescription PresentationCreationDate
        PresentationCreationTime PriorTreatmentDoseDescription
        ProcedureStepCancellationDateTime ProductExpirationDateTime PyramidDescription
        PyramidLabel ROICreatorSequence ROIDateTime ROIDescription ROIGenerationDescription
        ROIInterpreterSequence ROIObservationDateTime ROIObservationDescription
        ROIObservationLabel RTPlanDescription RTPlanName RadiopharmaceuticalStartDateTime
        RadiopharmaceuticalStartTime RadiopharmaceuticalStopDateTime
        RadiopharmaceuticalStopTime ReasonForOmissionDescription
        ReasonForRequestedProcedureCodeSequence ReasonForStudy
        ReasonForTheImagingServiceRequest ReasonForTheRequestedProcedure ReasonForVisit
        ReasonForVisitCodeSequence ReceivingAE ReferencedDigitalSignatureSequence
        ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
        ReferencedPatientSequence ReferencedSOPInstanceMACSequence ReferringPhysicianAddress
        ReferringPhysicianIdentificationSequence ReferringPhysicianTelephoneNumbers
        RegionOfResidence RequestAttributesSequence RequestedContrastAgent
        RequestedProcedureComments RequestedProcedureID RequestedProcedureLocation
        RequestedSeriesDescription RequestingAE RequestingPhysician RequestingService
        RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization
        ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsID
        ResultsIDIssuer RetrieveAETitle SOPAuthorizationDateTime ScheduledAdmissionDate
        ScheduledAdmissionTime ScheduledDischargeDate ScheduledDischargeTime
        ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
        ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
        ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
        ScheduledProcedureStepEndTime ScheduledProcedureStepExpirationDateTime
        ScheduledProcedureStepID ScheduledProcedureStepLocation
        ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate
        ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime
        ScheduledStationAETitle ScheduledStationGeographicLocationCodeSequence
        ScheduledStationName ScheduledStationNameCodeSequence ScheduledStudyLocation
        ScheduledStudyLocationAETitle ScheduledStudyStartDate ScheduledStudyStartTime
        ScheduledStudyStopDate ScheduledStudyStopTime SeriesDescription
        ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription
        ShieldingDeviceDescription SlideIdentifier SmokingStatus SourceManufacturer
        SpecialNeeds SpecimenAccessionNumber SpecimenDetailedDescription
        SpecimenShortDescription StationAETitle StructureSetDescription StructureSetName
        StudyArrivalDate StudyArrivalTime StudyComments StudyCompletionDate
        StudyCompletionTime StudyDescription StudyIDIssuer StudyReadDate StudyReadTime
        StudyVerifiedDate StudyVerifiedTime SubstanceAdministrationDateTime
        TelephoneNumberTrial TemplateLocalVersion TemplateVersion TextComments TextString
        TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration
        TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject
        TopicTitle TransducerIdentificationSequence TreatmentSites UDISequence
        UniqueDeviceIdentifier VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial
        VisitComments WaveformFilterDescription XRayDetectorLabel
        """
    ),
    "Z": _keywords(
        """
        AccessionNumber CalibrationDateTime ClinicalTrialCoordinatingCenterName
        ClinicalTrialProtocolName ClinicalTrialSiteID ClinicalTrialSiteName
        ClinicalTrialTimePointID ConceptualVolumeCombinationDescription
        ConceptualVolumeDescription ConsultingPhysicianName DeviceAlternateIdentifier
        FillerOrderNumberImagingServiceRequest FractionationNotes
        IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence
        ManufacturerDeviceIdentifier ParticipationDateTime PatientBirthDate PatientName
        PatientSex PlacerOrderNumberImagingServiceRequest PrescriptionNotes
        PrescriptionNotesSequence ROIInterpreter ROIName RTAccessoryDeviceSlotID
        RTAccessoryHolderSlotID RTPhysicianIntentNarrative
        RadiationGenerationModeDescription ReasonForSuperseding ReferringPhysicianName
        ReviewDate ReviewTime SourceOfPreviousValues SpecimenPreparationSequence
        StructureSetDate StructureSetTime StudyDate StudyID StudyTime
        TreatmentTechniqueNotes VerifyingObserverIdentificationCodeSequence
        """
    ),
    "D": _keywords(
        """
        AcquisitionFieldOfViewLabel AnnotationGroupLabel AnnotationGroupUID
        AssertionDateTime AttributeModificationDateTime BeamHoldTransitionDateTime
        CertificateOfSigner ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID
        ClinicalTrialSponsorName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID
        ContainerIdentifier ContentSequence ContextGroupLocalVersion ContextGroupVersion
        Date DateTime DecayCorrectionDateTime DestinationAE DeviceLabel
        DigitalSignatureDateTime EffectiveDateTime EncapsulatedDocument EntityLabel
        EntityLongLabel ExclusionStartDateTime FlowIdentifier FlowIdentifierSequence
        FrameAcquisitionDateTime FrameOriginTimestamp FrameReferenceDateTime
        FunctionalSyncPulse GraphicAnnotationSequence HangingProtocolCreationDateTime
        ImpedanceMeasurementDateTime InformationIssueDateTime InterlockDateTime
        InterlockDescription InterlockOriginDescription ModifyingSystem OverrideDateTime
        PersonIdentificationCodeSequence PersonName RTPlanLabel RTPrescriptionLabel
        RTToleranceSetLabel RadiationDoseIdentificationLabel
        RadiationDoseInVivoMeasurementLabel RadiationGenerationModeLabel
        ReasonForTheAttributeModification RecordedRTControlPointDateTime ReferencedDateTime
        SafePositionExitDate SafePositionExitTime SafePositionReturnDate
        SafePositionReturnTime SelectorAEValue SelectorASValue SelectorDAValue
        SelectorDTValue SelectorLOValue SelectorLTValue SelectorOBValue SelectorPNValue
        SelectorSHValue SelectorSTValue SelectorTMValue SelectorUNValue SelectorURValue
        SelectorUTValue SourceEndDateTime SourceIdentifier SourceStartDateTime
        SourceStrengthReferenceDate SourceStrengthReferenceTime SpecimenIdentifier
        StructureSetLabel Time TreatmentControlPointDate TreatmentControlPointTime
        TreatmentPositionGroupLabel TreatmentToleranceViolationDateTime
        TreatmentToleranceViolationDescription UserContentLabel UserContentLongLabel
        VerificationDateTime VerifyingObserverName VerifyingObserverSequence
        VerifyingOrganization XRayDetectorID XRaySourceID
        """
    ),
    "U": _keywords(
        """
        AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID
        DeviceUID DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID
        DosimetricObjectiveUID FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID
        InstanceCreatorUID IrradiationEventUID LargePaletteColorLookupTableUID
        ManufacturerDeviceClassUID MediaStorageSOPInstanceUID MultiplexGroupUID
        ObservationSubjectUIDTrial ObservationUID PaletteColorLookupTableUID PatientSetupUID
        PresentationDisplayCollectionUID PresentationSequenceCollectionUID PyramidUID
        RTTreatmentPhaseUID ReferencedConceptualVolumeUID ReferencedDoseReferenceUID
        ReferencedDosimetricObjectiveUID ReferencedFiducialsUID
        ReferencedFrameOfReferenceUID
        ReferencedGeneralPurposeScheduledProcedureStepTransactionUID
        ReferencedObservationUIDTrial ReferencedSOPInstanceUID
        ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID
        RelatedFrameOfReferenceUID RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID
        SourceConceptualVolumeUID SourceFrameOfReferenceUID SpecimenUID
        StorageMediaFileSetUID StudyInstanceUID SynchronizationFrameOfReferenceUID TargetUID
        TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TrackingUID
        TransactionUID TreatmentPositionGroupUID TreatmentSessionUID UID
        """
    ),
    "X/Z": _keywords(
        """
        AcquisitionContextSequence AcquisitionDate AcquisitionTime BarcodeValue LabelText
        PatientSexNeutered ReferencedStudySequence RequestedProcedureDescription
        ReviewerName SourceSerialNumber TreatmentMachineName
        """
    ),
    "X/D": _keywords(
        """
        AcquisitionDeviceProcessingDescription DateOfLastDetectorCalibration DetectorID
        EndAcquisitionDateTime FirstTreatmentDate InstanceCreationDate IntendedPhaseEndDate
        IntendedPhaseStartDate MostRecentTreatmentDate ObservationDateTime
        OperatorIdentificationSequence ProtocolName RTPlanDate RTPlanTime
        RTTreatmentApproachLabel SeriesDate SeriesTime StartAcquisitionDateTime
        TimeOfLastDetectorCalibration TreatmentDate TreatmentSite TreatmentTime
        """
    ),
    "Z/D": _keywords(
        """
        ContentCreatorName ContentDate ContentTime ContrastBolusAgent
        InstructionPerformedDateTime PatientID
        """
    ),
    "X/Z/D": _keywords(
        """
        AcquisitionDateTime DeviceSerialNumber InstanceCreationTime InstitutionCodeSequence
        InstitutionName OperatorsName ReferencedPerformedProcedureStepSequence StationName
        """
    ),
    "X/Z/U*": _keywords(
        """
        ReferencedImageSequence SourceImageSequence
        """
    ),
}
