//! `projection_loss` (being written).
pub struct ProjectionLoss;
impl ProjectionLoss {
    pub fn new(_: bool) -> Self {
        ProjectionLoss
    }
}
impl super::Metric for ProjectionLoss {
    fn name(&self) -> &str {
        "projection_loss"
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
