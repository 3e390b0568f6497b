//! `source_suppression` (being written).
pub struct SourceSuppression;
impl SourceSuppression {
    pub fn new(_: bool) -> Self {
        SourceSuppression
    }
}
impl super::Metric for SourceSuppression {
    fn name(&self) -> &str {
        "source_suppression"
    }
    fn hooks(&self, _: &super::RunContext) -> Vec<String> {
        todo!()
    }
    fn start_dataset(
        &mut self,
        _: &super::RunContext,
        _: &crate::data::Dataset,
    ) -> crate::Result<()> {
        todo!()
    }
    fn batch(&mut self, _: &super::RunContext, _: &super::BatchView) -> crate::Result<()> {
        todo!()
    }
    fn finish_dataset(
        &mut self,
        _: &super::RunContext,
        _: &crate::data::Dataset,
    ) -> crate::Result<Vec<crate::output::Table>> {
        todo!()
    }
}
